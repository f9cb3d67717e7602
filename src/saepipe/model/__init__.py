"""The language model: materialise it offline, load it into TransformerLens, name its hooks."""
