"""saepipe: a data-versioned pipeline that trains sparse autoencoders on a language model's activations."""

__version__ = "0.1.0"
