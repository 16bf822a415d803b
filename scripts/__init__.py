"""Maintenance scripts (conversion from jina-embeddings-v4, tiny test checkpoints); importable by the tests."""
