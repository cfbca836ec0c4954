"""Naming the module and the source line where tracing broke, with a hint on what to change."""

from __future__ import annotations

import linecache
import os
import re
import sysconfig
import traceback

import torch

from compiler.errors import CaptureError

_LIBRARY_DIRS = tuple(
    os.path.dirname(path) + os.sep
    for path in (torch.__file__, __file__)
) + (sysconfig.get_paths()["stdlib"] + os.sep,)

_HINTS = (
    (("data-dependent", "data dependent", "GuardOnDataDependent", "cannot be used as inputs to control flow",
      "item()", "Proxy object cannot be"),
     "the model branches on tensor values or reads them into Python (data-dependent control flow, "
     ".item(), float(tensor)); use torch.where or torch.cond, or compute the decision outside forward"),
    (("Constraints violated", "specialized", "specialize"),
     "an input dimension cannot vary as requested; pass dynamic_dims to fix it, or make the code "
     "independent of that size"),
    (("not supported", "Unsupported"),
     "an operation is not traceable; replace it with torch operations or move it out of forward"),
)


class ModuleTracker:
    """Context manager that remembers which module was running when an exception escaped."""

    def __init__(self, model: torch.nn.Module):
        self._paths = {id(module): name for name, module in model.named_modules()}
        self._stack: list[str] = []
        self.failed_path: str | None = None
        self._handles = []

    def __enter__(self) -> ModuleTracker:
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._enter_module),
            hooks.register_module_forward_hook(self._leave_module),
        ]
        return self

    def __exit__(self, error_type, error, trace) -> None:
        for handle in self._handles:
            handle.remove()
        if error is not None and self._stack:
            self.failed_path = self._stack[-1]

    def _enter_module(self, module, args) -> None:
        path = self._paths.get(id(module))
        if path is not None:
            self._stack.append(path)

    def _leave_module(self, module, args, output) -> None:
        if self._paths.get(id(module)) is not None and self._stack:
            self._stack.pop()


def user_source_line(error: BaseException) -> str | None:
    """``file:line: code`` of the innermost traceback frame outside torch, fxpress and stdlib."""
    best = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            if not frame.filename.startswith(_LIBRARY_DIRS) and not frame.filename.startswith("<"):
                code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
                best = f"{os.path.basename(frame.filename)}:{frame.lineno}: {code}"
        current = current.__cause__ or current.__context__
    return best


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n(?P<code>[^\n]*)')


def source_line_from_stack_trace(stack_trace: str | None) -> str | None:
    """``file:line: code`` of the innermost user frame in a node's ``stack_trace`` meta text."""
    best = None
    for match in _FRAME.finditer(stack_trace or ""):
        if not match["file"].startswith(_LIBRARY_DIRS) and not match["file"].startswith("<"):
            best = f"{os.path.basename(match['file'])}:{match['line']}: {match['code'].strip()}"
    return best


def hint_for(error: BaseException) -> str:
    """A one-line suggestion chosen from the error's text."""
    text = f"{type(error).__name__} {error}"
    for needles, hint in _HINTS:
        if any(needle in text for needle in needles):
            return hint
    return "rewrite the code at that line with torch operations only, or capture a submodule"


def explain_failure(errors: list[tuple[str, BaseException, str | None]], model) -> CaptureError:
    """One CaptureError from all front ends' failures, preferring torch.export's diagnosis."""
    front_end, error, module_path = next(
        (item for item in errors if item[0] == "torch.export"), errors[-1]
    )
    source = user_source_line(error)
    where = f"module {module_path!r}" if module_path is not None else "the model"
    if module_path == "":
        where = f"the root module ({type(model).__name__})"
    summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tried = ", ".join(name for name, _, _ in errors)
    message = (
        f"cannot capture {where}: {type(error).__name__}: {summary[:200]}"
        f"{f' at {source}' if source else ''}. Hint: {hint_for(error)}. (tried: {tried})"
    )
    captured = CaptureError(message, module_path=module_path, source=source)
    captured.__cause__ = error
    return captured
