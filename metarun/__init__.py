"""metarun: a config-driven meta-learning experiment runner."""

__version__ = "0.1.0"
