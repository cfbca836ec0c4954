"""Cleanup passes: no-op removal, constant folding, dead-code elimination."""
