"""Synthetic ground truth: activations drawn from a known dictionary, and SAEs scored against it.

    generate  the seeded setting (`SynthConfig`) and its truth (`Truth`): rows with their true codes
    store     the setting on disk: an ordinary activation cache + truth.safetensors + truth.json
    score     an SAE against the truth: MCC, recovered fraction, firing F1, shrinkage, FVU, L0
"""
