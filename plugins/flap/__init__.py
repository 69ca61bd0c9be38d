"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning with bias compensation."""
