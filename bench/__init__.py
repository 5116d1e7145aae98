"""Benchmarks: full-size random-weight models on the GPU, baseline and accelerated paths in one run."""
