"""lrem: Large Reasoning Embedding Models for product search (see README.md)."""
__version__ = "0.1.0"
