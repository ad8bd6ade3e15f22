"""Unit tests: pure functions and models, no services or processes."""
