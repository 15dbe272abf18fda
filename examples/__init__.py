"""Runnable examples: ``python -m examples.<name> --out DIR [--quick]`` from the repository root."""
