"""The zoo's on-disk cache of trained weights: where it lives, atomic writes, safe reads."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache directory.
CACHE_DIR_VARIABLE = "FXPRESS_CACHE_DIR"


def cache_dir() -> Path:
    """Returns $FXPRESS_CACHE_DIR, else $XDG_CACHE_HOME/fxpress, else ~/.cache/fxpress."""
    explicit = os.environ.get(CACHE_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache_home) if xdg_cache_home else Path.home() / ".cache"
    return base / "fxpress"


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> bool:
    """Writes a state dict atomically: to a temporary file beside `path`, then os.replace.

    A reader never sees a half-written file, and an interrupted write leaves no temporary file.
    Failing to write only costs a retraining later, so it is logged, not raised.

    Args:
        state_dict: Tensors to save.
        path: The destination file.

    Returns:
        Whether the file was written.
    """
    temporary_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            temporary_name = handle.name
            torch.save(state_dict, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, path)
        return True
    except OSError as error:
        logger.warning("could not write the weights cache %s: %s", path, error)
        if temporary_name is not None and os.path.exists(temporary_name):
            os.unlink(temporary_name)
        return False


def load_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """Reads a state dict written by `save_state_dict`, or None if it is missing or unreadable.

    Loads with `weights_only=True`, so a tampered file cannot run code.

    Args:
        path: The cache file.
    """
    if not path.is_file():
        return None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable cache means "retrain"
        logger.warning("ignoring the unreadable weights cache %s: %s", path, error)
        return None
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        logger.warning("ignoring the weights cache %s: not a state dict of tensors", path)
        return None
    return state_dict
