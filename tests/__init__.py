"""tokar tests."""
