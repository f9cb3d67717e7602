"""SAE training on cached activations: the loop, checkpoints, guards, end-to-end losses, tracking."""
