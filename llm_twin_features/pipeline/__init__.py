"""The stages and the audit: what a run does, free of Dagster."""
