"""Fusion passes: BatchNorm folding and activation fusion groups."""
