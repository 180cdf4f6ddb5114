"""Memory management and scheduling: pure Python, no torch, so its tests run in milliseconds."""
