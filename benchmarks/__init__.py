"""Microbenchmarks of fused_bn against PyTorch eager and torch.compile: ``python -m benchmarks``."""
