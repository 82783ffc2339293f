"""Tools around the stack: local services manager, demo, workspace and process helpers for tests and benchmarks."""
