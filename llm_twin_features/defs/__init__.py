"""Dagster definitions, one module per concern, loaded by `definitions.py`."""
