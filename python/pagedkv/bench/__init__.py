"""Benchmarks: ``python -m pagedkv.bench {memory}``."""
