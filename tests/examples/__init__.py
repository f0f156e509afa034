"""The examples under ``examples/``, run in a tiny configuration."""
