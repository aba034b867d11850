"""Benchmarks: engine time now; the side-by-side suite against Torch-Pruning builds on it."""
