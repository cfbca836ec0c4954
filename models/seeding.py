"""Deterministic construction of randomly initialised modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the body with torch's CPU generator seeded, restoring the caller's state after.

    Module constructors draw their initial weights from the global generator; forking it keeps
    the zoo reproducible without disturbing the random stream of the code that loads a model.

    Args:
        seed: The seed for the body.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
