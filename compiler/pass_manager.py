"""The pass manager: runs a pipeline, verifies after every pass, and writes the ledger.

Verification is on by default (as in MLIR; torch.fx leaves it off, the mistake not to copy):
after each pass the graph must lint, a pass reporting ``modified=False`` must have changed
nothing, and a pass declared exact must keep outputs within fp32 tolerance on the probe batch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.fx as fx

from compiler import ir, probe
from compiler.errors import FxpressError, PassError, VerificationError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.report import Ledger, LedgerEntry
from compiler.targets import Tolerance

logger = logging.getLogger(__name__)

EXACT_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-4)


class PassManager:
    """Runs passes in order with checks between them.

    Args:
        passes: the pipeline.
        verify: run the checks after every pass (default on).
        dump_dir: if set, write the IR after capture and after each pass as ``NN_<pass>.txt``.
        tolerance: what "exact" means for outputs on the probe batch.
        progress: called with each pass's name when it finishes (for progress bars).
        after_pass: called as ``after_pass(index, name, gm, modified)`` with the IR after capture (index 0,
            ``"capture"``) and after every pass, before the next one changes it (for bisection).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        dump_dir: str | Path | None = None,
        tolerance: Tolerance = EXACT_TOLERANCE,
        progress: Callable[[str], None] | None = None,
        after_pass: Callable[[int, str, fx.GraphModule, bool], None] | None = None,
    ):
        self.passes = list(passes)
        self.after_pass = after_pass
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.tolerance = tolerance
        self.progress = progress

    def run(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        reference: tuple[torch.Tensor, ...],
        ledger: Ledger,
    ) -> fx.GraphModule:
        """Run every pass on ``gm``; append an entry per pass to ``ledger``; return the result."""
        outputs = probe.run_annotated(gm, ctx.probe_inputs)
        ledger.initial = {**_snapshot(gm), "drift": probe.drift(outputs, reference).to_dict()}
        ctx.captured_macs = ledger.initial["macs"]
        self._dump(0, "capture", gm)
        if self.after_pass is not None:
            self.after_pass(0, "capture", gm, True)
        for index, pass_ in enumerate(self.passes, start=1):
            gm, outputs = self._run_one(index, pass_, gm, ctx, (reference, outputs), ledger)
        ledger.fallbacks.extend(ctx.fallbacks)
        return gm

    def _run_one(self, index, pass_, gm, ctx, references, ledger) -> tuple[fx.GraphModule, tuple]:
        """Run one pass; its drift is measured against eager, its exactness against the outputs before it.

        An exact pass after a lossy one (a cleanup after pruning) must keep what the lossy pass
        left, not the original outputs.
        """
        reference, previous = references
        before = _snapshot(gm)
        before_print = ir.fingerprint(gm)
        started = time.perf_counter()
        result = self._call(pass_, gm, ctx, ledger)
        seconds = time.perf_counter() - started
        gm = result.graph_module
        self._check_structure(pass_, result, before_print, ledger)
        outputs = probe.run_annotated(gm, ctx.probe_inputs)
        drift = probe.drift(outputs, reference)
        if self.verify and pass_.exact:
            self._check_exact(pass_, outputs, previous, ledger)
        after = _snapshot(gm)
        entry = LedgerEntry(
            name=pass_.name, options=dict(pass_.options), modified=result.modified,
            seconds=seconds, stats=result.stats, op_delta=_op_delta(before["ops"], after["ops"]),
            params_before=before["params"], params_after=after["params"],
            macs_before=before["macs"], macs_after=after["macs"],
            nodes_before=before["nodes"], nodes_after=after["nodes"], drift=drift.to_dict(),
        )
        ledger.entries.append(entry)
        logger.info("pass %s: modified=%s %s in %.3f s", pass_.name, result.modified, result.stats, seconds)
        logger.debug("graph after %s:\n%s", pass_.name, ir.graph_text(gm))
        self._dump(index, pass_.name, gm)
        if self.after_pass is not None:
            self.after_pass(index, pass_.name, gm, result.modified)
        if self.progress is not None:
            self.progress(pass_.name)
        return gm, outputs

    def _call(self, pass_: Pass, gm, ctx, ledger) -> PassResult:
        try:
            result = pass_(gm, ctx)
        except FxpressError as error:
            error.args = (f"{error} [in pass {pass_.name!r}{_after(ledger)}]",)
            raise
        except Exception as error:
            raise PassError(f"pass {pass_.name!r} failed{_after(ledger)}: {error!r}") from error
        if not isinstance(result, PassResult):
            raise PassError(f"pass {pass_.name!r} returned {type(result).__name__}, not PassResult")
        return result

    def _check_structure(self, pass_, result: PassResult, before_print: str, ledger) -> None:
        gm = result.graph_module
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as error:
            raise VerificationError(
                f"graph does not lint after pass {pass_.name!r}{_after(ledger)}: {error}"
            ) from error
        if self.verify and not result.modified and ir.fingerprint(gm) != before_print:
            raise VerificationError(
                f"pass {pass_.name!r} reported modified=False but changed the graph{_after(ledger)}"
            )

    def _check_exact(self, pass_, outputs, previous, ledger) -> None:
        if probe.within_tolerance(outputs, previous, self.tolerance.rtol, self.tolerance.atol):
            return
        drift = probe.drift(outputs, previous)
        raise VerificationError(
            f"exact pass {pass_.name!r} changed the outputs on the probe batch beyond "
            f"rtol={self.tolerance.rtol}, atol={self.tolerance.atol} (max abs diff "
            f"{drift.max_abs:.3g}, cosine {drift.cosine:.6f}){_after(ledger)}"
        )

    def _dump(self, index: int, name: str, gm: fx.GraphModule) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{index:02d}_{name}.txt").write_text(ir.graph_text(gm))


def _after(ledger: Ledger) -> str:
    names = [entry.name for entry in ledger.entries]
    return f" (after {', '.join(names)})" if names else " (the first pass)"


def _snapshot(gm: fx.GraphModule) -> dict:
    return {
        "nodes": len(gm.graph.nodes),
        "params": ir.parameter_count(gm),
        "macs": probe.total_macs(gm),
        "ops": dict(ir.op_histogram(gm)),
    }


def _op_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = Counter(after)
    delta.subtract(before)
    return {op: count for op, count in sorted(delta.items()) if count}
