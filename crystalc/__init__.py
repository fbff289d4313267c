"""crystalc: a multi-target compiler for crystal language models."""

__version__ = "0.1.0"
