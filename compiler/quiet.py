"""Keeping third-party chatter out of fxpress's output while it calls into torch and onnx."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

# torch.export and the ONNX exporter log graphs and per-package warnings at WARNING level; a
# failure is reported by fxpress itself, in one line, so these stay at ERROR while we trace.
NOISY_LOGGERS = ("torch", "torch.onnx", "torch.fx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_torch(names: tuple[str, ...] = NOISY_LOGGERS) -> Iterator[None]:
    """Silence warnings from the named loggers and torch's direct prints to stderr.

    torch.export prints the partial graph of a failed trace to stderr; fxpress reports the failure
    itself, in one line, naming the module and source line.
    """
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    # torch._logging gives some child loggers levels of their own; disable() overrides them all.
    previous_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous_disable)
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)
