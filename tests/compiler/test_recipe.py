"""Recipes: every key validated before any work, data sources read as a user has them, TOML round trips."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from compiler.errors import UsageError
from compiler.gates import Gate, evaluate, parse_gate, quality_metrics
from compiler.recipe import from_dict, load_recipe, recipe_target, to_toml
from compiler.recipe_data import DataContext, load_labels, load_source

BASE = {"model": {"source": "digits-cnn"}}


def _recipe(tmp_path, body: str):
    path = tmp_path / "recipe.toml"
    path.write_text(textwrap.dedent(body))
    return load_recipe(path)


@pytest.mark.parametrize(("tables", "message"), [
    ({"modle": {"source": "x"}}, "recipe key modle: unknown key (did you mean 'model'?)"),
    ({"compile": {"targte": "cpu-int8"}}, "recipe key compile.targte: unknown key (did you mean 'compile.target'?)"),
    ({"compile": {"target": "cpu-int9"}}, "recipe key compile.target: 'cpu-int9' is not one of"),
    ({"compile": {"float_macs": 1.5}}, "recipe key compile.float_macs: expected a number >= 0 and <= 1, got 1.5"),
    ({"compile": {"threads": 0}}, "recipe key compile.threads: expected an integer >= 1, got 0"),
    ({"compile": {"float_modules": "conv1"}}, "recipe key compile.float_modules: expected a non-empty list"),
    ({"compile": {"target": "cpu-fp32", "float_modules": ["conv1"]}},
     "recipe key compile.float_modules: applies to quantising targets"),
    ({"compile": {"input_format": {"layout": "NWHC"}}}, "did you mean 'NHWC'?"),
    ({"compile": {"float_prefix": -1}}, "recipe key compile.float_prefix: expected an integer >= 0, got -1"),
    ({"compile": {"target": "cpu-fp32", "float_prefix": 2}},
     "recipe key compile.float_prefix: applies to quantising targets"),
    ({"passes": {"calibrat": {}}}, "recipe key passes.calibrat"),
    ({"compile": {"target": "cpu-int8"}, "passes": {"calibrate": {"observr": "mse"}}},
     "recipe key passes.calibrate.observr: pass 'calibrate' has no such option (did you mean 'observer'?)"),
    ({"prune": {"macs": 0.3, "importanc": "l1"}}, "recipe key prune.importanc: unknown key (did you mean"),
    ({"prune": {"importance": "l1"}}, "prune needs one budget"),
    ({"low_rank": {"macs": 0.3, "metod": "svd"}}, "did you mean 'low_rank.method'?"),
    ({"recover": {"seconds": -1}}, "recipe key recover.seconds: expected a number >= 0"),
    ({"recover": {"augmnt": "none"}}, "did you mean 'recover.augment'?"),
    ({"data": {"calibration": {"zoo": True, "npy": "x.npy"}}}, "give exactly one data source"),
    ({"data": {"evaluation": {"samples": 3}}}, "give exactly one data source"),
    ({"data": {"evaluation": {"npy": "x.npy", "crop": 3}}}, "recipe key data.evaluation.crop: applies to images"),
    ({"data": {"validation": {"zoo": True}}}, "recipe key data.validation: unknown key"),
    ({"gates": ["top1 >= 0.9"]}, "recipe key gates[0]: unknown metric 'top1'"),
    ({"gates": ["sqnr_db > 30"]}, "needs '>=' or '<='"),
    ({"gates": ["latency_ratio <= 1 vs onnx"]}, "unknown latency baseline 'onnx'"),
    ({"bench": {"runs": 1}}, "recipe key bench.runs: expected an integer >= 3"),
    ({"output": {"directory": 3}}, "recipe key output.directory: expected a non-empty string"),
])
def test_each_bad_key_or_value_is_one_line_naming_it(tables, message):
    with pytest.raises(UsageError) as caught:
        from_dict({**BASE, **tables})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_model_source_is_required():
    with pytest.raises(UsageError, match="recipe key model.source: is required"):
        from_dict({"compile": {"target": "cpu-fp32"}})


def test_not_toml_names_the_line(tmp_path):
    with pytest.raises(UsageError, match=r"not valid TOML: .*line 2"):
        _recipe(tmp_path, "[model]\nsource = \n")


def test_the_target_gets_float_layers_and_pass_overrides():
    recipe = from_dict({**BASE, "compile": {"target": "cpu-int8", "float_modules": ["conv1"]},
                        "passes": {"calibrate": {"observer": "minmax"}}})
    target = recipe_target(recipe)
    assert target.quant_policy["float_modules"] == ["conv1"]
    assert next(spec for spec in target.pipeline if spec.name == "calibrate").options["observer"] == "minmax"


def test_toml_written_reads_back_and_a_patch_merges():
    data = {"gates": ["top1_agreement >= 0.97"], **BASE, "compile": {"target": "cpu-int8"},
            "data": {"evaluation": {"zoo": True, "samples": 10}}}
    recipe = from_dict(data)
    assert load_recipe_text(to_toml(recipe.data)) == data
    patched = recipe.patched({"compile": {"float_modules": ["a.b", "c"]}})
    assert patched.get("compile.float_modules") == ["a.b", "c"] and patched.get("compile.target") == "cpu-int8"
    assert patched.sha256 != recipe.sha256 and patched.gates == recipe.gates


def load_recipe_text(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_gates_parse_and_judge():
    gate = parse_gate("top1_agreement >= 0.97")
    assert gate == Gate("top1_agreement", ">=", 0.97) and gate.passes(0.97) and not gate.passes(0.9699)
    assert parse_gate("latency_ratio <= 0.8").baseline == "export"
    assert parse_gate("latency_ratio <= 0.8 vs fp32").key == "latency_ratio vs fp32"
    assert parse_gate("sqnr_db >= 30").passes(None)  # identical outputs: infinite SQNR
    assert not parse_gate("cosine_min >= 0.9").passes(float("nan"))
    with pytest.raises(UsageError, match="accuracy_drop cannot be measured here .*no labels"):
        evaluate([parse_gate("accuracy_drop <= 0.5")], {"top1_agreement": 1.0})


def test_quality_metrics_on_known_outputs():
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    actual = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    metrics = quality_metrics((actual,), (expected,), labels)
    assert metrics["top1_agreement"] == 0.75
    assert metrics["accuracy_original"] == 0.75 and metrics["accuracy_compiled"] == 1.0
    assert metrics["accuracy_drop"] == pytest.approx(-25.0)
    assert metrics["cosine_min"] == pytest.approx(0.0) and metrics["cosine_mean"] < 1


def _context(tmp_path, pixels=None, zoo=None):
    return DataContext(from_dict(BASE, path=tmp_path / "recipe.toml"), zoo, pixels)


def test_an_images_folder_is_decoded_resized_and_centre_cropped(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    gradient = np.tile(np.arange(0, 200, dtype=np.uint8), (100, 1))  # 100 x 200, columns 0..199
    Image.fromarray(np.stack([gradient] * 3, axis=2)).save(folder / "a.png")
    Image.fromarray(np.full((60, 60, 3), 7, dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    table = {"images": "images", "resize": 50, "crop": 40}
    (pixels,) = load_source(table, "calibration", _context(tmp_path, pixels={"layout": "NCHW"}))
    assert pixels.shape == (2, 3, 40, 40) and pixels.dtype == torch.uint8
    left, right = int(pixels[0, 0, 20, 0]), int(pixels[0, 0, 20, -1])
    # short side 100 -> 50 (width 200 -> 100); the centre 40 columns are 30..69, the photo's 60..139
    assert 56 < left < 66 and 134 < right < 144
    (normalised,) = load_source({**table, "mean": [0.5] * 3, "std": [0.5] * 3}, "calibration", _context(tmp_path))
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised[1], torch.full((3, 40, 40), 7 / 255 * 2 - 1), atol=0.02)


def test_images_of_a_model_without_a_normalisation_need_mean_and_std(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(UsageError, match="data.calibration: give mean and std"):
        load_source({"images": "images", "resize": 8, "crop": 8}, "calibration", _context(tmp_path))


def test_arrays_factory_and_labels(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 1, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "xy.npz", ids=np.zeros((4, 6), dtype=np.int64), mask=np.ones((4, 6), dtype=np.int64))
    np.save(tmp_path / "labels.npy", np.arange(5))
    (tmp_path / "data.py").write_text(
        "import torch\ndef make():\n    return [torch.zeros(2, 3), torch.ones(1, 3)]\n")
    context = _context(tmp_path)
    (single,) = load_source({"npy": "x.npy", "samples": 3}, "evaluation", context)
    assert single.shape == (3, 1, 8, 8)
    mask, ids = load_source({"npz": "xy.npz", "arrays": ["mask", "ids"]}, "train", context)
    assert mask.sum() == 24 and ids.sum() == 0
    (made,) = load_source({"factory": "data.py:make"}, "calibration", context)
    assert made.shape == (3, 3) and made.sum() == 3
    assert load_labels({"npy": "x.npy", "labels": "labels.npy"}, context, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize(("table", "message"), [
    ({"npy": "missing.npy"}, "data.evaluation.npy: .*missing.npy does not exist"),
    ({"npz": "xy.npz", "arrays": ["nope"]}, "data.evaluation.arrays: .* has no array\\(s\\) nope"),
    ({"factory": "data.py:absent"}, "data.evaluation.factory: data.py has no function 'absent'"),
    ({"factory": "data.py:broken"}, "data.evaluation.factory: data.py:broken raised ZeroDivisionError"),
    ({"factory": "data.py"}, "expected 'file.py:function'"),
    ({"images": "nowhere"}, "data.evaluation.images: .* is not a folder"),
    ({"text": "empty.txt"}, "holds no sentences"),
    ({"zoo": True}, "the model is not a zoo model"),
])
def test_a_bad_source_names_its_key_and_file(tmp_path, table, message):
    np.savez(tmp_path / "xy.npz", ids=np.zeros((4, 6)))
    (tmp_path / "data.py").write_text("def broken():\n    return 1 / 0\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match=message):
        load_source(table, "evaluation", _context(tmp_path))


def test_sentences_are_tokenised_by_the_zoo_text_model(tmp_path):
    import models

    (tmp_path / "s.txt").write_text("The first sentence.\n\nAnd a second one, a little longer.\n")
    ids, mask = load_source({"text": "s.txt", "tokenizer": "minilm-l6", "seq_len": 16}, "evaluation",
                            _context(tmp_path))
    assert ids.shape == mask.shape == (2, 16)
    assert torch.equal(ids, models.load("minilm-l6").encode(["The first sentence.",
                                                             "And a second one, a little longer."], seq_len=16)[0])
