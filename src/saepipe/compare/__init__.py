"""Comparing finished runs: which SAE is better, by how much, and whether the difference is more than seed noise;
and which features two runs share (`saepipe compare`)."""
