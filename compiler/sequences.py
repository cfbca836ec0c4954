"""Padded token sequences: which input is the attention mask, and whether padding may be cut.

Sentence data comes padded to one length (the zoo's MiniLM sentences: 128 tokens, 16 of them real
on average), so most positions of every activation are padding. Passes that fit to activations
(pruning's importance and least-squares re-fit) or train on them (recovery) would spend most of
their rows and time on positions the outputs never read: measured on MiniLM at -30% MACs before
recovery, scoring and re-fitting on padded rows left cosine 0.864 to the unpruned embeddings, on
the real tokens of 1024 sentences 0.963.

:func:`find_padding` looks among a model's inputs for a 0/1 mask whose rows are ones then zeros,
and *checks* on the samples with the most padding that cutting each to its own length leaves the
model's first output unchanged (on the kept positions, where the output has them). Only then do
passes cut padding (:meth:`Padding.trim`) or drop padded rows (:meth:`Padding.valid`); a model
whose outputs read padding (or whose graph fixed the length) gets ``None`` and is treated as before.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)

_CHECKED_SAMPLES = 4
_RTOL, _ATOL = 1e-3, 1e-4


@dataclasses.dataclass(frozen=True)
class Padding:
    """The mask input (``mask_index``) of token inputs shaped ``(batch, length)``; padding positions are 0."""

    mask_index: int
    length: int  # the padded length of the samples it was found on

    def lengths(self, samples: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Real tokens per sample."""
        return samples[self.mask_index].ne(0).sum(dim=1)

    def trim(self, samples: tuple[torch.Tensor, ...], length: int | None = None) -> tuple[torch.Tensor, ...]:
        """Every token input cut to ``length`` positions (default: the longest sample's real tokens)."""
        length = int(self.lengths(samples).max()) if length is None else length
        shape = samples[self.mask_index].shape
        return tuple(tensor[:, :length] if _is_token_input(tensor, shape) else tensor for tensor in samples)

    def valid(self, samples: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The real positions of ``samples``, a bool ``(batch, length)`` mask."""
        return samples[self.mask_index].ne(0)


def find_padding(model, samples: tuple[torch.Tensor, ...]) -> Padding | None:
    """The attention mask among ``samples`` if cutting padding provably leaves ``model``'s output alone."""
    index = _mask_candidate(samples)
    if index is None:
        return None
    padding = Padding(index, int(samples[index].shape[1]))
    lengths = padding.lengths(samples)
    if int(lengths.min()) == padding.length:
        return None  # nothing padded: nothing to gain
    for sample in torch.argsort(lengths)[:_CHECKED_SAMPLES].tolist():
        one = tuple(tensor[sample:sample + 1] for tensor in samples)
        reason = _trim_changes_output(model, padding, one, int(lengths[sample]))
        if reason:
            logger.info("padding in input %d is not cut: %s", index, reason)
            return None
    return padding


def _mask_candidate(samples: tuple[torch.Tensor, ...]) -> int | None:
    """The first 2-D integer or bool input of 0s and 1s whose every row is ones then zeros (at least one 1)."""
    for index, tensor in enumerate(samples):
        if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex() or tensor.shape[1] < 2:
            continue
        values = tensor.long()
        if not bool(((values == 0) | (values == 1)).all()) or not bool(values[:, 0].eq(1).all()):
            continue
        if bool((values[:, 1:] <= values[:, :-1]).all()):
            return index
    return None


def _trim_changes_output(model, padding: Padding, sample: tuple[torch.Tensor, ...], length: int) -> str | None:
    """Why cutting ``sample`` to ``length`` tokens is unsafe, or None when the output stays the same."""
    with torch.no_grad():
        full = _first(model(*sample))
        try:
            cut = _first(model(*padding.trim(sample, length)))
        except Exception as error:  # noqa: BLE001 - any failure means the graph needs the full length
            return f"the model does not run at {length} tokens ({type(error).__name__}: {error})"
    if full.dim() >= 2 and full.shape[1] == padding.length and cut.shape[1] == length:
        full = full[:, :length]
    if full.shape != cut.shape:
        return f"the output's shape changes with the length ({tuple(full.shape)} against {tuple(cut.shape)})"
    if not torch.allclose(full.float(), cut.float(), rtol=_RTOL, atol=_ATOL * max(1.0, float(full.abs().max()))):
        return "the output changes when padding is cut (the model reads padded positions)"
    return None


def _is_token_input(tensor: torch.Tensor, shape: torch.Size) -> bool:
    return tensor.dim() >= 2 and tensor.shape[:2] == shape


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def calibration_samples(model, data, count: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, dict | None]:
    """The first samples of ``data`` (batches) to fit on; for padded token data, their real-token mask.

    Returns ``(samples, valid, padding)``: ``count`` samples concatenated, or, where
    :func:`find_padding` finds padding that ``model`` ignores, the first samples whose real tokens
    reach as many as ``count`` full-length samples hold, cut to the longest of them, with ``valid``
    marking their real positions and ``padding`` describing it for a ledger (else both None).
    """
    samples = _first_samples(data, count)
    padding = find_padding(model, samples)
    if padding is None:
        return samples, None, None
    samples = padding.trim(_first_samples(data, count * padding.length, padding))
    valid = padding.valid(samples)
    return samples, valid, {"mask_input": padding.mask_index, "samples": int(valid.shape[0]),
                            "real_tokens": int(valid.sum()), "padded_length": padding.length}


def _first_samples(data, count: int, padding: Padding | None = None) -> tuple[torch.Tensor, ...]:
    """The first ``count`` samples of the batches, concatenated; with ``padding``, ``count`` real tokens."""
    batches, total = [], 0
    for batch in data:
        batches.append(batch)
        total += int(padding.lengths(batch).sum()) if padding is not None else batch[0].shape[0]
        if total >= count:
            break
    samples = tuple(torch.cat([batch[i] for batch in batches]) for i in range(len(batches[0])))
    if padding is not None:  # the first samples whose real tokens reach ``count``
        count = int(torch.searchsorted(padding.lengths(samples).cumsum(0), count)) + 1
    return tuple(tensor[:count] for tensor in samples)
