"""Integration tests: real RabbitMQ and PostgreSQL, the embedded stores, Dagster instances
and in-process runs."""
