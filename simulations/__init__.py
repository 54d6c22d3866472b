"""Bundled simulation scenarios (TOML files), loadable by name."""
