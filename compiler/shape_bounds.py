"""Upper bounds the exporter cannot see: a sequence that indexes an embedding table by position.

A BERT slices its position ids from a buffer, so export itself stops the sequence at the table's
length. GPT-2 builds them with ``arange`` and RoBERTa from a cumulative sum over the tokens; both
then gather from an ``nn.Embedding``, and export finds no bound, because an index out of range is
a run-time error, not a shape guard. The artifact would accept any length and fail deep in the
runtime past the table.

So for each dynamic dimension left unbounded (the batch excepted), the eager model is run at batch
1 with that dimension one past the row count of each of the model's embedding tables, smallest
first, up to :data:`MAX_PROBED_LENGTH`. Where it fails, the largest length that runs is found by
bisection, and that is the bound. A model that runs past every table (T5's relative positions)
stays unbounded. Every probe is a real eager run; the ledger records each bound and why.
"""

from __future__ import annotations

import logging

import torch
import torch.utils._pytree as pytree

from compiler.dynamic_shapes import DynamicDims

logger = logging.getLogger(__name__)

#: Tables longer than this are not probed (an eager run at that length could take minutes).
MAX_PROBED_LENGTH = 4096


def probe_upper_bounds(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dims: DynamicDims,
) -> tuple[DynamicDims, dict[str, dict]]:
    """``dims`` with the bounds the eager model shows, and a record per bounded dimension."""
    tables = sorted({module.num_embeddings for module in model.modules() if isinstance(module, torch.nn.Embedding)})
    records: dict[str, dict] = {}
    for name in _unbounded_names(dims):
        record = _probe_one(model, inputs, dims, name, tables)
        if record is not None:
            records[name] = record
            dims = _with_max(dims, name, record["max"])
            logger.info("capture: %s bounded at %d (%s)", name, record["max"], record["reason"])
    return dims, records


def _unbounded_names(dims: DynamicDims) -> list[str]:
    names = {spec[0] for per_input in dims.values() for dim, spec in per_input.items() if dim > 0 and spec[2] is None}
    return sorted(names)


def _probe_one(model, inputs, dims: DynamicDims, name: str, tables: list[int]) -> dict | None:
    example = _example_size(inputs, dims, name)
    for rows in (rows for rows in tables if example <= rows <= MAX_PROBED_LENGTH):
        failure = _failure_at(model, inputs, dims, name, rows + 1)
        if failure is None:
            continue
        largest = _largest_running(model, inputs, dims, name, example, rows + 1)
        return {"max": largest, "table_rows": rows,
                "reason": f"eager fails at {largest + 1} ({failure}); found by probing, not by export"}
    return None


def _example_size(inputs, dims: DynamicDims, name: str) -> int:
    return next(inputs[index].shape[dim] for index, per_input in dims.items()
                for dim, spec in per_input.items() if spec[0] == name)


def _largest_running(model, inputs, dims: DynamicDims, name: str, runs: int, fails: int) -> int:
    """Bisection between a length that runs and one that fails."""
    while fails - runs > 1:
        middle = (runs + fails) // 2
        if _failure_at(model, inputs, dims, name, middle) is None:
            runs = middle
        else:
            fails = middle
    return runs


def _failure_at(model, inputs, dims: DynamicDims, name: str, length: int) -> str | None:
    """None when eager runs at batch 1 with ``name`` at ``length``, else its error in one line."""
    resized = resize_inputs(inputs, dims, name, length)
    try:
        with torch.no_grad():
            outputs = model(*resized)
    except Exception as error:  # noqa: BLE001 - any failure past a table is what we are looking for
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:120] if text else ''}"
    finite = all(bool(torch.isfinite(leaf).all()) for leaf in pytree.tree_leaves(outputs)
                 if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
    return None if finite else "NaN or Inf in the outputs"


def resize_inputs(inputs: tuple[torch.Tensor, ...], dims: DynamicDims, name: str, length: int) -> tuple:
    """``inputs`` at batch 1 (where the batch may vary), with every dim called ``name`` tiled or cut to ``length``."""
    resized = []
    for index, tensor in enumerate(inputs):
        if 0 in dims.get(index, {}) and dims[index][0][0] != name:
            tensor = tensor[:1]  # a dynamic batch: one sample is enough
        for dim, spec in dims.get(index, {}).items():
            if spec[0] == name:
                repeats = [1] * tensor.dim()
                repeats[dim] = -(-length // tensor.shape[dim])
                tensor = tensor.repeat(*repeats).narrow(dim, 0, length)
        resized.append(tensor)
    return tuple(resized)


def _with_max(dims: DynamicDims, name: str, high: int) -> DynamicDims:
    return {index: {dim: (spec[0], spec[1], high) if spec[0] == name else spec for dim, spec in per_input.items()}
            for index, per_input in dims.items()}
