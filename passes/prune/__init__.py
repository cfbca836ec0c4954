"""Structured pruning: coupled channel groups (``groups``); importance, slicing and the pass come next."""
