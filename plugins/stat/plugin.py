"""stat plugin: hook implementations (being written)."""
