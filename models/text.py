"""Real English sentences for the sentence encoder, taken from the Python standard library.

The corpus is the docstrings of the standard library's top-level modules (their classes and
functions too), read with `ast` (nothing is imported), split into sentences and kept only when
they look like prose: 5 to 60 words, a capital first letter, a final full stop, question or
exclamation mark, and none of the characters that mark code (brackets, `=`, `_`, dotted names,
...). Paragraphs with indented lines or doctest prompts are skipped as code. The result is
deduplicated and keeps file and source order, so it is the same in every process for a given
Python version (3,400 or so sentences on CPython 3.11).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import random
import re
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from models.zoo_model import check_count

DEFAULT_SEQUENCE_LENGTH = 128
#: Room for the two special tokens, [CLS] and [SEP].
MIN_SEQUENCE_LENGTH = 2
MIN_WORDS = 5
MAX_WORDS = 60
SPLIT_SEED = 0
CALIBRATION_SEED = 1
EVALUATION_SEED = 2

_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"[A-Z][A-Za-z0-9 ,.'!?-]*[.!?]")
_CODE_MARKS = re.compile(r"[<>{}\[\]()=_\\`|#@$%^*~/:;\"]|\.\.|\b\w+\.\w+")
_CODE_PARAGRAPH = re.compile(r"^\s{2,}\S|>>>", re.MULTILINE)

#: Turns sentences into the model's batched inputs: (sentences, sequence length) -> tensors.
Tokenise = Callable[[Sequence[str], int], tuple[torch.Tensor, ...]]


def _docstrings(path: Path) -> Iterator[str]:
    """Yields the module, class and function docstrings of one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                yield docstring


def _is_prose(sentence: str) -> bool:
    """Whether a sentence reads as English prose rather than code or a fragment."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not _PROSE.fullmatch(sentence) or _CODE_MARKS.search(sentence):
        return False
    return sum(any(character.isdigit() for character in word) for word in words) <= 2


def sentences_from_docstring(docstring: str) -> Iterator[str]:
    """Yields the prose sentences of one docstring, whitespace normalised.

    Args:
        docstring: A cleaned docstring (as `ast.get_docstring` returns it).
    """
    for paragraph in re.split(r"\n\s*\n", docstring):
        if _CODE_PARAGRAPH.search(paragraph):
            continue
        for sentence in _SENTENCE_BOUNDARY.split(" ".join(paragraph.split())):
            if _is_prose(sentence):
                yield sentence


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Returns the deduplicated sentences of the standard library's docstrings, in source order."""
    standard_library = Path(sysconfig.get_paths()["stdlib"])
    sentences = (
        sentence
        for path in sorted(standard_library.glob("*.py"))
        for docstring in _docstrings(path)
        for sentence in sentences_from_docstring(docstring)
    )
    return tuple(dict.fromkeys(sentences))


@functools.lru_cache(maxsize=1)
def corpus_halves() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Returns the corpus split into disjoint (calibration, evaluation) halves, each shuffled.

    One seeded shuffle decides which half a sentence goes to; each half is then shuffled again
    with its own seed, so neither half is in source order.
    """
    sentences = list(corpus())
    random.Random(SPLIT_SEED).shuffle(sentences)
    middle = len(sentences) // 2
    calibration, evaluation = sentences[:middle], sentences[middle:]
    random.Random(CALIBRATION_SEED).shuffle(calibration)
    random.Random(EVALUATION_SEED).shuffle(evaluation)
    return tuple(calibration), tuple(evaluation)


@dataclasses.dataclass(frozen=True)
class SentenceData:
    """Unlabelled sentences, tokenised to (input_ids, attention_mask) for an encoder.

    Attributes:
        tokenise: Turns sentences and a sequence length into the model's inputs.
        default_sequence_length: The length used when a call gives none.
        max_sequence_length: The longest sequence the model takes (its position embeddings).
    """

    tokenise: Tokenise
    default_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    max_sequence_length: int = 512

    def encode(
        self, sentences: Sequence[str], seq_len: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Tokenises sentences, padded or truncated to `seq_len` tokens.

        Args:
            sentences: At least one sentence.
            seq_len: Tokens per row, special tokens included; the default length when None.

        Raises:
            ValueError: For no sentences, a bare string, or a length outside [2, maximum].
        """
        if isinstance(sentences, str) or not sentences:
            raise ValueError("encode takes a non-empty sequence of sentences, not a single string")
        length = self.default_sequence_length if seq_len is None else seq_len
        check_count(length, self.max_sequence_length, "tokens per sequence")
        if length < MIN_SEQUENCE_LENGTH:
            raise ValueError(f"seq_len must be at least {MIN_SEQUENCE_LENGTH}: [CLS] and [SEP]")
        return self.tokenise(list(sentences), length)

    def calibration(self, count: int, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Returns the first `count` calibration sentences, tokenised."""
        sentences = corpus_halves()[0]
        check_count(count, len(sentences), "calibration sentences")
        return self.encode(sentences[:count], seq_len)

    def evaluation(self, count: int, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Returns the first `count` evaluation sentences, tokenised."""
        sentences = corpus_halves()[1]
        check_count(count, len(sentences), "evaluation sentences")
        return self.encode(sentences[:count], seq_len)

    def labels(self, count: int) -> None:
        """Returns None: the sentences carry no labels."""
        check_count(count, len(corpus_halves()[1]), "evaluation sentences")
        return None
