"""Wanda-sp: the structured Wanda baseline of the FLAP paper (An et al., AAAI 2024)."""
