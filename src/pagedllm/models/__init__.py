"""Model implementations, their registry and weight loading."""
