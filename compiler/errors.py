"""Typed errors: each names what is wrong, where, and what to do; the CLI maps them to exit codes."""

from __future__ import annotations


class FxpressError(Exception):
    """Base class of every error fxpress raises on purpose."""

    exit_code = 70  # internal error unless a subclass says otherwise


class UsageError(FxpressError):
    """A bad argument: unknown target, bad option, missing file (exits 2, as argparse does)."""

    exit_code = 2


class TargetError(UsageError):
    """An unknown or inconsistent target."""


class InputError(UsageError):
    """A call with inputs the artifact does not accept (count, dtype, rank, or a size out of range).

    Attributes name the input, the dimension (None when the whole input is at fault), what was
    given and what the artifact accepts.
    """

    def __init__(self, message: str, *, input_name: str | None = None, dimension: int | None = None,
                 given: object = None, accepted: object = None):
        super().__init__(message)
        self.input_name = input_name
        self.dimension = dimension
        self.given = given
        self.accepted = accepted


class CaptureError(FxpressError):
    """The model could not be captured into the IR by any front end."""

    exit_code = 3

    def __init__(self, message: str, *, module_path: str | None = None, source: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.source = source


class UnsupportedOperatorError(FxpressError):
    """The IR holds operators the backend cannot lower; ``operators`` lists (op, module path)."""

    exit_code = 4

    def __init__(self, message: str, *, operators: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.operators = operators or []


class CalibrationDataError(FxpressError):
    """Calibration data that is empty, malformed, or does not match the example inputs."""

    exit_code = 5


class AccuracyError(FxpressError):
    """A compiled model is further from the original than the target's tolerance allows."""

    exit_code = 6


class ArtifactError(FxpressError):
    """An artifact directory that cannot be written, read, or trusted."""

    exit_code = 7


class FallbackError(FxpressError):
    """In strict mode: the ledger recorded a fallback (a layer left unoptimised, static shapes, ...)."""

    exit_code = 8


class PassError(FxpressError):
    """A pass refused its input (a precondition failed) or broke a postcondition."""

    exit_code = 70


class VerificationError(PassError):
    """The pass manager's check after a pass failed; the message names the pass and its predecessors."""


class LoweringError(FxpressError):
    """The backend failed to produce or load a valid model for a reason other than an operator."""

    exit_code = 70


class EmulationError(FxpressError):
    """A backend cannot emulate this IR with its kernels (a tensor off its quantisation grid, an unknown op)."""

    exit_code = 70
