"""End-to-end tests: the CLI, Dagster runs, daemons and the laptop stack as real processes."""
