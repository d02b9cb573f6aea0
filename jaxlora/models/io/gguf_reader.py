"""Reading GGUF files (llama.cpp's format): metadata, dequantised tensors, and the BPE tokenizer.

Uses the ``gguf`` package (numpy only). Quantised tensors (``Q4_1``, ``Q8_0``, …) are
dequantised to float32 with ``gguf.quants.dequantize``; shapes come out in numpy order, so a
linear weight is ``(out_features, in_features)`` exactly like a PyTorch ``nn.Linear.weight``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from jaxlora.models.io import packaged

__all__ = ["GGUFFile", "tokenizer_from_gguf"]

#: GGUF token types (llama.cpp ``LLAMA_TOKEN_TYPE_*``) that this reader treats specially.
_CONTROL = 3
_USER_DEFINED = 4


class GGUFFile:
    """A GGUF file's metadata and tensors, dequantised lazily to float32 numpy arrays."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Opens ``path`` (memory-mapped; nothing is dequantised yet).

        The parsed metadata is shared with any earlier ``GGUFFile`` of the same unchanged file (same
        size and modification time): loading a model's weights and then its tokenizer reads it once.

        Raises:
            ValueError: If the file does not exist.
        """
        self.path = packaged.check_file(path, "GGUF")
        stat = os.stat(self.path)
        self._reader = _parsed(os.path.realpath(self.path), stat.st_mtime_ns, stat.st_size)
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}

    @property
    def metadata(self) -> dict[str, Any]:
        """All key/value metadata as Python values (strings, numbers, lists)."""
        return {key: field.contents() for key, field in self._reader.fields.items()}

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value, or ``default`` if the key is absent."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """One metadata value.

        Raises:
            ValueError: If the key is absent, naming the file.
        """
        field = self._reader.fields.get(key)
        if field is None:
            raise ValueError(f"GGUF metadata key `{key}` missing from `{self.path}`")
        return field.contents()

    @property
    def tensor_names(self) -> list[str]:
        """Names of the stored tensors, in file order."""
        return list(self._tensors)

    def raw_tensor(self, name: str) -> Any:
        """One tensor as stored: ``gguf``'s ``ReaderTensor`` (``data``, ``tensor_type``, ``shape``).

        Raises:
            ValueError: If the file has no tensor of that name.
        """
        if name not in self._tensors:
            raise ValueError(
                f"tensor `{name}` not in `{self.path}`; it has {self.tensor_names[:8]}…"
            )
        return self._tensors[name]

    def tensor(self, name: str) -> np.ndarray:
        """Dequantises one tensor to a float32 array in numpy (row-major, ``(out, in)``) order.

        Raises:
            ValueError: If the file has no tensor of that name.
        """
        from gguf import quants

        info = self.raw_tensor(name)
        array = quants.dequantize(info.data, info.tensor_type)
        expected = tuple(int(n) for n in reversed(info.shape))
        return np.ascontiguousarray(array, dtype=np.float32).reshape(expected)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, mtime_ns: int, size: int) -> Any:
    """``gguf.GGUFReader`` of one version of a file (read-only, so safe to share). Parsing is slow:
    about 6 CPU seconds for SmolLM2-135M, nearly all of it the tokenizer's 49k tokens and merges
    in the metadata, which every reader parses even when only the weights are wanted."""
    del mtime_ns, size  # in the cache key only: a rewritten file is parsed again
    import gguf

    return gguf.GGUFReader(path)


def _pre_tokenizer(name: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("gpt2", "default"):
        return byte_level
    if name == "smollm":
        # llama.cpp's "smollm" pre-tokenizer: every digit is its own piece, then GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(
        f"GGUF pre-tokenizer `tokenizer.ggml.pre={name!r}` is not supported; "
        "supported: 'smollm', 'gpt2', 'default'"
    )


def tokenizer_from_gguf(file: GGUFFile):
    """Builds the byte-level BPE ``tokenizers.Tokenizer`` described by a GGUF file's metadata.

    Uses ``tokenizer.ggml.tokens`` (the vocabulary, ids in list order), ``tokenizer.ggml.merges``
    and ``tokenizer.ggml.token_type``: control tokens (``<|im_start|>``, ``<|endoftext|>``, …)
    become special tokens, which are never split and are dropped by
    ``decode(..., skip_special_tokens=True)``. No BOS token is prepended, as the file's
    ``tokenizer.ggml.add_bos_token`` (if present) must say.

    Raises:
        ValueError: If the file's tokenizer is not a GPT-2 style BPE with a known pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = file.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"only byte-level BPE (`tokenizer.ggml.model='gpt2'`) is supported, got {kind!r}"
        )
    if file.get("tokenizer.ggml.add_bos_token", False):
        raise ValueError("`tokenizer.ggml.add_bos_token=True` is not supported")
    tokens: list[str] = file.require("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in file.require("tokenizer.ggml.merges")]
    token_types = file.get("tokenizer.ggml.token_type", [1] * len(tokens))

    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(file.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL]
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in user])
    if tokenizer.get_vocab_size() != len(tokens):
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, GGUF lists {len(tokens)}"
        )
    return tokenizer
