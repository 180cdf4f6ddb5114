"""The device side: model, KV cache tensors and the step's tensor work."""
