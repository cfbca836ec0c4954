"""Small models and fixtures shared by several test files (import as ``tests.support``)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batch_norm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms: the defaults (mean 0, var 1) hide folding bugs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            count = module.num_features
            module.running_mean.copy_(torch.rand(count, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(count, generator=generator) - 0.5)
    return model.eval()


class Block(nn.Module):
    """Conv + BatchNorm + ReLU: the pattern BatchNorm folding and fusion marking look for."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Two blocks and a linear head; module paths ``layers.0.conv``, ``head``, ..."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(Block(3, 8), Block(8, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.layers(x).mean((2, 3)))


class PositionTable(nn.Module):
    """Token and position embeddings, like BERT: the sequence may not exceed the position table (32)."""

    def __init__(self, positions: int = 32):
        super().__init__()
        self.tokens = nn.Embedding(50, 8)
        self.positions = nn.Embedding(positions, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.tokens(input_ids) + self.positions.weight[: input_ids.shape[1]]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids in [0, 50) and a mask with the second half of the first row padded."""
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(0, 50, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return ids, mask
