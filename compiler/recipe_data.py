"""The data a recipe names: the zoo's samples, a folder of images, arrays, sentences, or a factory.

Each source gives a tuple of tensors batched as the model's inputs (and, for evaluation, the
labels where a ``labels`` file gives them). Faults name the recipe key and the file at fault.

- ``zoo = true``: the zoo model's bundled calibration, training or evaluation samples.
- ``images = "dir"``: every ``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp`` under the folder, in sorted
  order, decoded by Pillow to RGB, the short side resized to ``resize`` (default 256, bilinear),
  centre-cropped to ``crop`` (default 224); normalised by ``mean``/``std`` (the zoo entry's by default),
  or left as 8-bit pixels when the recipe compiles for ``input_format.dtype = "uint8"``.
- ``npy = "x.npy"``: one array, the model's single input; ``npz = "x.npz"``: one array per input,
  in ``arrays`` order (default: the file's order).
- ``text = "sentences.txt"``: one sentence per line, tokenised by the zoo text model named by
  ``tokenizer`` (default: the recipe's model) to ``seq_len`` tokens.
- ``factory = "data.py:make"``: ``make()`` returns a tuple of batched tensors, or an iterable of
  batches (tensors or tuples of tensors), concatenated.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compiler.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_RESIZE, DEFAULT_CROP = 256, 224


@dataclass(frozen=True)
class DataContext:
    """What a source needs beyond its table: the recipe, the zoo entry and the pixel format."""

    recipe: object  # compiler.recipe.Recipe
    zoo_entry: object = None
    pixels: dict | None = None  # the recipe's input_format when it compiles for uint8 pixels


def load_source(table: dict, kind: str, context: DataContext) -> tuple[torch.Tensor, ...]:
    """The samples of the data table ``data.<kind>``, at most ``samples`` of them."""
    where = f"data.{kind}"
    samples = table.get("samples")
    if "zoo" in table:
        tensors = _zoo(table, kind, context, samples or _ZOO_DEFAULTS[kind], where)
    elif "images" in table:
        tensors = _images(table, context, where)
    elif "npy" in table or "npz" in table:
        tensors = _arrays(table, context, where)
    elif "text" in table:
        tensors = _text(table, context, where)
    else:
        tensors = _factory(table["factory"], context, f"{where}.factory")
    tensors = tuple(tensor[:samples] for tensor in tensors) if samples else tensors
    if not tensors or tensors[0].shape[0] == 0:
        raise UsageError(f"recipe key {where}: the source holds no samples")
    return tensors


def load_labels(table: dict, context: DataContext, count: int) -> torch.Tensor | None:
    """The evaluation labels: a ``labels`` array file, or the zoo's labels for zoo data; else None."""
    if "labels" in table:
        path = context.recipe.resolve_path(table["labels"])
        array = _read_array(path, "data.evaluation.labels")
        return torch.from_numpy(np.asarray(array)).long().reshape(-1)[:count]
    if "zoo" in table and context.zoo_entry is not None:
        return context.zoo_entry.eval_labels(count)
    return None


_ZOO_DEFAULTS = {"calibration": 256, "train": 256, "evaluation": 200}


def _zoo(table: dict, kind: str, context: DataContext, count: int, where: str) -> tuple[torch.Tensor, ...]:
    entry = context.zoo_entry
    if entry is None:
        raise UsageError(f"recipe key {where}.zoo: the model is not a zoo model, so it has no bundled data; "
                         "give images, npy, npz, text or factory")
    options = {"seq_len": table["seq_len"]} if "seq_len" in table else {}
    if context.pixels is not None:
        options["pixels"] = True
    read = entry.eval_data if kind == "evaluation" else entry.calibration_data
    try:
        tensors = tuple(read(count, **options))
    except (ValueError, TypeError) as error:
        raise UsageError(f"recipe key {where}: {error}") from None
    return _laid_out(tensors, context.pixels)


def _laid_out(tensors: tuple[torch.Tensor, ...], pixels: dict | None) -> tuple[torch.Tensor, ...]:
    if pixels is not None and pixels.get("layout") == "NHWC":
        return tuple(tensor.permute(0, 2, 3, 1).contiguous() for tensor in tensors)
    return tensors


def _images(table: dict, context: DataContext, where: str) -> tuple[torch.Tensor, ...]:
    folder = context.recipe.resolve_path(table["images"])
    if not folder.is_dir():
        raise UsageError(f"recipe key {where}.images: {folder} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"recipe key {where}.images: {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    files = files[: table.get("samples", len(files))]
    resize, crop = table.get("resize", DEFAULT_RESIZE), table.get("crop", DEFAULT_CROP)
    if crop > resize:
        raise UsageError(f"recipe key {where}.crop: {crop} is larger than resize {resize}")
    pixels = torch.stack([_decode(path, resize, crop, where) for path in files])  # (N, 3, crop, crop) uint8
    if context.pixels is not None:
        return _laid_out((pixels,), context.pixels)
    mean, std = _normalisation(table, context, where)
    normalised = (pixels.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return (normalised,)


def _decode(path: Path, resize: int, crop: int, where: str) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError(f"recipe key {where}.images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"recipe key {where}.images: {path} is not a readable image ({error})") from None
    scale = resize / min(rgb.size)
    rgb = rgb.resize((max(crop, round(rgb.width * scale)), max(crop, round(rgb.height * scale))),
                     Image.Resampling.BILINEAR)
    left, top = (rgb.width - crop) // 2, (rgb.height - crop) // 2
    array = np.asarray(rgb.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _normalisation(table: dict, context: DataContext, where: str) -> tuple[list[float], list[float]]:
    zoo_format = getattr(context.zoo_entry, "input_format", None) or {}
    mean, std = table.get("mean", zoo_format.get("mean")), table.get("std", zoo_format.get("std"))
    if mean is None or std is None:
        raise UsageError(f"recipe key {where}: give mean and std (on the [0, 1] scale) for images of a model that "
                         "is not a zoo image model, e.g. mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]")
    return mean, std


def _arrays(table: dict, context: DataContext, where: str) -> tuple[torch.Tensor, ...]:
    key = "npy" if "npy" in table else "npz"
    path = context.recipe.resolve_path(table[key])
    loaded = _read_array(path, f"{where}.{key}")
    if key == "npy":
        return (torch.from_numpy(np.ascontiguousarray(loaded)),)
    names = table.get("arrays", list(loaded.files))
    missing = [name for name in names if name not in loaded.files]
    if missing:
        raise UsageError(f"recipe key {where}.arrays: {path} has no array(s) {', '.join(missing)}; "
                         f"it holds {', '.join(loaded.files)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(loaded[name])) for name in names)


def _read_array(path: Path, where: str):
    if not path.is_file():
        raise UsageError(f"recipe key {where}: {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UsageError(f"recipe key {where}: {path} is not a readable .npy/.npz file without pickles "
                         f"({error})") from None


def _text(table: dict, context: DataContext, where: str) -> tuple[torch.Tensor, ...]:
    path = context.recipe.resolve_path(table["text"])
    if not path.is_file():
        raise UsageError(f"recipe key {where}.text: {path} does not exist")
    sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not sentences:
        raise UsageError(f"recipe key {where}.text: {path} holds no sentences (one per line)")
    entry = _tokenizer(table, context, where)
    try:
        return tuple(entry.encode(sentences[: table.get("samples", len(sentences))], seq_len=table.get("seq_len")))
    except (ValueError, TypeError) as error:
        raise UsageError(f"recipe key {where}: {error}") from None


def _tokenizer(table: dict, context: DataContext, where: str):
    import models

    name = table.get("tokenizer")
    if name is None:
        if context.zoo_entry is None:
            raise UsageError(f"recipe key {where}.tokenizer: name a zoo text model whose tokenizer to use "
                             f"({', '.join(models.names())}), or use a factory source")
        return context.zoo_entry
    if name not in models.names():
        raise UsageError(f"recipe key {where}.tokenizer: {name!r} is not a zoo model; known: "
                         f"{', '.join(models.names())}")
    return models.load(name)


def _factory(spec: str, context: DataContext, where: str) -> tuple[torch.Tensor, ...]:
    path_text, _, name = spec.rpartition(":")
    path = context.recipe.resolve_path(path_text)
    if not path_text.endswith(".py") or not name:
        raise UsageError(f"recipe key {where}: expected 'file.py:function', got {spec!r}")
    if not path.is_file():
        raise UsageError(f"recipe key {where}: {path} does not exist")
    module = _import(path, where)
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"recipe key {where}: {path.name} has no function {name!r}")
    try:
        produced = function()
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is the user's to fix
        raise UsageError(f"recipe key {where}: {spec} raised {type(error).__name__}: {error}") from error
    return _batches(produced, where)


def _import(path: Path, where: str):
    name = f"fxpress_recipe_data_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's code
        failure = f"{type(error).__name__}: {error}"
        raise UsageError(f"recipe key {where}: importing {path.name} failed: {failure}") from error
    return module


def _batches(produced: object, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(produced, torch.Tensor):
        return (produced,)
    if isinstance(produced, tuple) and produced and all(isinstance(item, torch.Tensor) for item in produced):
        return produced
    if not isinstance(produced, Iterable):
        raise UsageError(f"recipe key {where}: expected a tuple of tensors or an iterable of batches, got "
                         f"{type(produced).__name__}")
    batches = [(batch,) if isinstance(batch, torch.Tensor) else tuple(batch) for batch in produced]
    if not batches or any(not all(isinstance(t, torch.Tensor) for t in batch) for batch in batches):
        raise UsageError(f"recipe key {where}: every batch must be a tensor or a tuple of tensors")
    if len({len(batch) for batch in batches}) != 1:
        raise UsageError(f"recipe key {where}: batches hold different numbers of tensors")
    try:
        return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
    except RuntimeError as error:
        raise UsageError(f"recipe key {where}: batches do not concatenate ({error})") from None
