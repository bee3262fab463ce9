"""selftaught."""
