"""LLM-Pruner without tuning (Ma et al., NeurIPS 2023): first-order Taylor importance of coupled groups."""
