"""fisher plugin: hook implementations (being written)."""
