"""The front half of the engine: requests in, outputs out, one step at a time."""
