"""The package's version, in a module of its own so that modules that record it (checkpoints) need not import the package root."""

__version__ = "0.1.0"
