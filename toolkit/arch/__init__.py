"""Architecture adapters: where each layer's attention units and MLP neurons live."""
