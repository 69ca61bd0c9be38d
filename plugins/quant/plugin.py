"""quant plugin: hook implementations (being written)."""
