"""The package's version, in the bottom layer so that every layer may report it."""

__version__ = "0.1.0"
