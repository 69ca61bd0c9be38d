"""Example third-party plugin for tshrink (see CONTRIBUTING.md)."""
