"""The laptop runtime: run launcher and worker, run coordinator, dead-run reaper, model
server and local stack. Configured by `dagster.yaml`; not part of the code location."""
