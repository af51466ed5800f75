"""Benchmarks of the iomux backends and reactor against peers (see bench/README.md)."""
