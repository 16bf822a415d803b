"""Benchmarks: encode() against jina's reference path (``benchmark``) and the server under load (``load_test``)."""
