"""Tools for nova-embeddings-v1: conversion from jina-embeddings-v4, serving, training, evaluation, benchmarks.

The model itself is the remote code at the repository root (loaded with ``trust_remote_code=True``); this
package holds the tools around it, reached through one command, ``nova-embeddings <subcommand>``.
"""

__version__ = "0.1.0"
