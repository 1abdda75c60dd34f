"""Shared primitives every layer may use: settings, keys, URLs, error text, report vocabulary."""
