"""Padded token sequences: the mask is found only where cutting padding provably leaves the outputs alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from compiler.capture import capture
from compiler.sequences import Padding, find_padding

VOCAB, WIDTH, LENGTH = 50, 8, 12


class MaskedEncoder(nn.Module):
    """Embedding, one masked self-attention, masked mean pooling: padding never reaches the output."""

    def __init__(self, pool: str = "masked"):
        super().__init__()
        self.pool = pool
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)

    def forward(self, ids, mask):
        x = self.embed(ids)
        x = x + self.attention(x, x, x, key_padding_mask=mask == 0, need_weights=False)[0]
        if self.pool == "masked":
            weights = mask.unsqueeze(-1).to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1)
        if self.pool == "tokens":
            return x
        return x.mean(1)  # reads the padded positions


class FixedLength(MaskedEncoder):
    def forward(self, ids, mask):
        return super().forward(ids, mask).reshape(ids.shape[0], WIDTH) + ids.reshape(-1, LENGTH)[:, :1]


def tokens(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(lengths), LENGTH), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("pool", ["masked", "tokens"])
def test_the_mask_is_found_when_cutting_padding_leaves_the_output_alone(pool):
    torch.manual_seed(0)
    samples = tokens([3, 5, 12, 7])
    padding = find_padding(MaskedEncoder(pool).eval(), samples)
    assert padding == Padding(mask_index=1, length=LENGTH)
    assert padding.lengths(samples).tolist() == [3, 5, 12, 7]
    assert padding.valid(samples).sum() == 27
    cut = padding.trim(tuple(tensor[:2] for tensor in samples))
    assert [tuple(tensor.shape) for tensor in cut] == [(2, 5), (2, 5)]


@pytest.mark.parametrize("model, samples", [
    (MaskedEncoder("mean"), tokens([3, 5, 12])),  # the pooling reads padded positions
    (FixedLength(), tokens([3, 5, 12])),  # the graph fixes the length
    (MaskedEncoder(), tokens([12, 12])),  # nothing is padded
    (MaskedEncoder(), (tokens([3, 5])[0], 1 - tokens([3, 5])[1])),  # zeros then ones: not a padding mask
], ids=["reads-padding", "fixed-length", "unpadded", "not-a-mask"])
def test_padding_is_left_alone_where_cutting_it_is_not_proven_safe(model, samples):
    torch.manual_seed(0)
    assert find_padding(model.eval(), samples) is None


def test_inputs_that_are_not_tokens_are_not_cut():
    padding = Padding(mask_index=1, length=LENGTH)
    ids, mask = tokens([2, 4])
    extra = torch.ones(2, 3)
    cut = padding.trim((ids, mask, extra))
    assert cut[0].shape == (2, 4) and cut[2] is extra


def test_the_zoo_minilm_graph_lets_padding_be_cut():
    minilm = models.load("minilm-l6")
    samples = minilm.calibration_data(8)
    gm = capture(minilm.model, minilm.example_inputs).graph_module
    padding = find_padding(gm, samples)
    assert padding is not None and padding.mask_index == 1 and padding.length == samples[1].shape[1]
    assert padding.valid(samples).float().mean() < 0.5  # the zoo's sentences are mostly padding
