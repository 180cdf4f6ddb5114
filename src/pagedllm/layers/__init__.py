"""Building blocks of the models: normalisation, rotary embeddings, activations."""
