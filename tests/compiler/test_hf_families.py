"""Hugging Face model families through cpu-fp32: BERT, DistilBERT, RoBERTa, GPT-2, ViT, the Whisper
encoder and the T5 encoder, each built from a small config with random weights (no downloads).

These are the models users bring. Each must compile with the default dynamic dimensions and no
fallback (no drop to batch-only or static shapes), keep the batch (and, for token models, the
sequence) dynamic, record the sequence bound the position table sets where the exporter finds
one, and match eager at batch sizes and sequence lengths other than the example's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import transformers

from compiler import InputError, compile

RTOL, ATOL = 1e-3, 1e-5  # fp32 vs ONNX Runtime
VOCAB = 100
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 16


# --- wrappers: named forward parameters, the last hidden state out --------------------------------


class TokenEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask=attention_mask).last_hidden_state


class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).last_hidden_state


class AudioEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_features):
        return self.model(input_features).last_hidden_state


# --- families ------------------------------------------------------------------------------------


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, attn_implementation="eager",
    )
    return TokenEncoder(transformers.BertModel(config))


def distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
        attn_implementation="eager",
    )
    return TokenEncoder(transformers.DistilBertModel(config))


def roberta() -> nn.Module:
    config = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, attn_implementation="eager",
    )
    return TokenEncoder(transformers.RobertaModel(config))


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager",
    )
    return TokenEncoder(transformers.GPT2Model(config))


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, attn_implementation="eager",
    )
    return ImageEncoder(transformers.ViTModel(config))


def whisper_encoder() -> nn.Module:
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=2,
        decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=30,
        max_target_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, attn_implementation="eager",
    )
    return AudioEncoder(transformers.WhisperModel(config).get_encoder())


def t5_encoder() -> nn.Module:
    config = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, attn_implementation="eager",
    )
    return TokenEncoder(transformers.T5EncoderModel(config))


def token_inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Ids in [3, VOCAB) (clear of the special tokens); the last row's last 3 positions are padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, -3:] = 0
    return input_ids, attention_mask


def image_inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def audio_inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Whisper's encoder takes exactly 2 * max_source_positions frames: only the batch varies."""
    return (torch.randn(batch, 16, 60, generator=torch.Generator().manual_seed(seed)),)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], tuple[torch.Tensor, ...]]  # (batch, length, seed) -> inputs
    tokens: bool
    sequence_max: int | None = None  # the sequence bound the ledger records (None: unbounded)
    probed: bool = False  # the bound comes from eager probes, not from export


FAMILIES = [
    Family("bert", bert, token_inputs, tokens=True, sequence_max=64),
    Family("distilbert", distilbert, token_inputs, tokens=True, sequence_max=64),
    # RoBERTa's positions start after its padding index (1): 64 rows hold sequences of 62
    Family("roberta", roberta, token_inputs, tokens=True, sequence_max=62, probed=True),
    Family("gpt2", gpt2, token_inputs, tokens=True, sequence_max=64, probed=True),
    Family("vit", vit, image_inputs, tokens=False),
    Family("whisper-encoder", whisper_encoder, audio_inputs, tokens=False),
    Family("t5-encoder", t5_encoder, token_inputs, tokens=True),
]


@pytest.fixture(scope="module", params=[pytest.param(family, id=family.name) for family in FAMILIES])
def compiled_family(request):
    family = request.param
    torch.manual_seed(0)
    model = family.build().eval()
    example = family.inputs(EXAMPLE_BATCH, EXAMPLE_LENGTH, 0)
    compiled = compile(model, target="cpu-fp32", example_inputs=example)
    return family, model, compiled


# --- tests ---------------------------------------------------------------------------------------


def test_captures_with_dynamic_shapes_and_no_fallback(compiled_family):
    family, _, compiled = compiled_family
    front_end = compiled.report.capture["front_end"]
    assert "static" not in front_end, f"{family.name}: {front_end}"
    assert "batch dynamic only" not in front_end, f"{family.name}: {front_end}"
    assert compiled.report.fallbacks == []


def test_batch_and_sequence_are_dynamic(compiled_family):
    family, _, compiled = compiled_family
    inputs = compiled.manifest["inputs"]
    assert len(inputs) == (2 if family.tokens else 1)
    for record in inputs:
        dims = record["dynamic_dims"]
        assert dims["0"][0] == "batch", f"{family.name} {record['name']}: {dims}"
        if family.tokens:
            assert dims["1"][0] == "sequence", f"{family.name} {record['name']}: {dims}"
        else:
            assert set(dims) == {"0"}, f"{family.name} {record['name']}: {dims}"
    if family.tokens:  # T5's relative positions have no bound
        for name, dims in compiled.report.capture["dynamic_dims"].items():
            assert dims["1"][2] == family.sequence_max, f"{family.name} {name}: {dims}"
    probed = compiled.report.capture["probed_bounds"]
    assert (probed["sequence"]["max"] if family.probed else probed) == (family.sequence_max if family.probed else {})


def test_a_sequence_past_the_bound_is_an_input_error_and_eager_fails_there_too(compiled_family):
    family, model, compiled = compiled_family
    if family.sequence_max is None:
        pytest.skip(f"{family.name} has no sequence bound")
    inputs = family.inputs(1, family.sequence_max + 1, 0)
    message = f"is {family.sequence_max + 1}; the artifact accepts 1 to {family.sequence_max}"
    with pytest.raises(InputError, match=message):
        compiled(*inputs)
    with pytest.raises((IndexError, RuntimeError)), torch.no_grad():
        model(*inputs)
    assert compiled(*family.inputs(1, family.sequence_max, 0)).shape[1] == family.sequence_max


def test_matches_eager_at_other_batch_sizes_and_lengths(compiled_family):
    family, model, compiled = compiled_family
    lengths = (8, 24) if family.tokens else (EXAMPLE_LENGTH,)
    cases = [(batch, length) for batch in (1, 3) for length in lengths]
    for seed, (batch, length) in enumerate(cases, 1):
        inputs = family.inputs(batch, length, seed)
        with torch.no_grad():
            expected = model(*inputs)
        actual = compiled(*inputs)
        assert actual.shape == expected.shape, f"{family.name} batch {batch} length {length}"
        torch.testing.assert_close(
            actual.double(), expected.double(), rtol=RTOL, atol=ATOL,
            msg=lambda message, batch=batch, length=length: f"{family.name} batch {batch} length {length}: {message}",
        )
