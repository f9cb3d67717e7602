"""Activations of the model at a hook: windows, extraction and the activation cache."""
