"""Writing a Llama-family or Gemma model, LoRA merged in, as a Hugging Face checkpoint directory.

:func:`save_hf_merged` folds the adapter into the base (``W + s·A·B`` by :func:`jaxlora.merge`, in
the base dtype) and :func:`save_hf` writes ``config.json`` and safetensors shards (with
``model.safetensors.index.json`` when there is more than one) that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. :func:`config_to_hf` is the inverse of
:func:`jaxlora.models.hf.llama.config_from_hf` (a Llama-family config goes through
:mod:`jaxlora.models.hf.llama_export`). A :class:`~jaxlora.models.gemma.GemmaConfig`
goes through :mod:`jaxlora.models.hf.gemma_export` and
:func:`jaxlora.models.hf.gemma.expected_tensors` instead.

Example (a tiny random model; writes one ``model.safetensors``):
    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jaxlora.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4, rope_interleaved=False)
    >>> ids = jnp.ones((1, 2), int)
    >>> params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
    >>> d = tempfile.mkdtemp()
    >>> save_hf(d, cfg, params)
    >>> sorted(os.listdir(d))
    ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora._src import validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.files import atomic
from jaxlora._src.tree.core import merge
from jaxlora._src.types import LoraTree
from jaxlora.models.gemma.config import GemmaConfig
from jaxlora.models.hf import gemma, gemma_export
from jaxlora.models.hf.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from jaxlora.models.hf.llama import config_from_hf, expected_tensors
from jaxlora.models.hf.llama_export import config_to_hf as _llama_config_to_hf
from jaxlora.models.hf.llama_export import model_type as model_type
from jaxlora.models.llama.config import LlamaConfig

__all__ = ["config_to_hf", "model_type", "save_hf", "save_hf_merged"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS["GIB"] = 2**30
_WRITTEN = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _family(config: Any) -> tuple[Any, Any, Any]:
    """``(expected_tensors, config_to_hf, config_from_hf)`` of ``config``'s model family."""
    if isinstance(config, GemmaConfig):
        return (
            gemma.expected_tensors,
            gemma_export.config_to_hf,
            gemma.config_from_hf,
        )
    if isinstance(config, LlamaConfig):
        return expected_tensors, _llama_config_to_hf, config_from_hf
    raise TypeError(f"`config` must be a LlamaConfig or a GemmaConfig, got {type(config).__name__}")


def config_to_hf(config: LlamaConfig | GemmaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict for ``config`` (``model_type`` from :func:`model_type`, or
    :func:`jaxlora.models.hf.gemma_export.model_type` for a Gemma).

    Example:
        >>> doc = config_to_hf(LlamaConfig(rope_interleaved=False))
        >>> doc["model_type"], doc["num_key_value_heads"], doc["tie_word_embeddings"]
        ('llama', 3, True)
    """
    return _family(config)[1](config, dtype)


def _shard_size(max_shard_size: int | str) -> int:
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([KMG]I?B|B)?\s*", str(max_shard_size).upper())
        if match is None:
            raise ValueError(
                f"`max_shard_size` must be a byte count or a string such as '5GB' or '500MB', "
                f"got {max_shard_size!r}"
            )
        size = int(match[1]) * _UNITS[match[2] or ""]
    if size < 1:
        raise ValueError(f"`max_shard_size` must be positive, got {max_shard_size!r}")
    return size


def _plan(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Tensor names in shards of at most ``limit`` bytes (a larger tensor gets its own)."""
    shards, current, total = [], [], 0
    for name, size in sizes.items():
        if current and total + size > limit:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    return [*shards, current] if current else shards


def _check_arguments(directory: Any, hf_config: Any) -> None:
    """The arguments every writer shares, checked before anything is computed or written."""
    validate.path("directory", directory)
    if hf_config is not None and not isinstance(hf_config, Mapping):
        raise TypeError(
            "`hf_config` must be None or a Hugging Face config dict (config.json's contents), got "
            f"{type(hf_config).__name__}"
        )
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"`directory` `{os.fspath(directory)}` is a file, not a directory; pass the directory "
            "to write the checkpoint into"
        )


def _hf_config(config: Any, hf_config: Mapping[str, Any] | None, dtype: str) -> dict:
    _, to_hf, from_hf = _family(config)
    if hf_config is None:
        return to_hf(config, dtype)
    if from_hf(hf_config) != config:
        raise ValueError(
            f"`hf_config` describes {from_hf(hf_config)}, not the model's `config` {config}"
        )
    return {**hf_config, "torch_dtype": dtype}


def _fitting_leaves(params: Mapping[str, Any], specs: Mapping[str, Any]) -> dict[tuple, Any]:
    """``params`` flattened, once every leaf is checked against ``specs`` (path and shape)."""
    # flax leaves flatten_dict unannotated; pyright would infer its leaves from the code.
    flat: dict[tuple, Any] = traverse_util.flatten_dict(dict(params))
    wanted = {spec.path for spec in specs.values()}
    if set(flat) != wanted:
        missing = sorted("/".join(p) for p in wanted - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - wanted)
        raise ValueError(f"`params` do not fit `config`: missing {missing}, unexpected {extra}")
    for name, spec in specs.items():
        if tuple(flat[spec.path].shape) != spec.target_shape:
            raise ValueError(
                f"`params` leaf {'/'.join(spec.path)} ({name}) has shape "
                f"{tuple(flat[spec.path].shape)}, expected {spec.target_shape}"
            )
        # An integer or quantised leaf would be written as a weight that no reader (load_hf,
        # transformers) takes for one; dequantise first.
        if not jnp.issubdtype(flat[spec.path].dtype, jnp.floating):
            raise TypeError(
                f"`params` leaf {'/'.join(spec.path)} ({name}) is {flat[spec.path].dtype}; "
                "weights are written as floating point (dequantise a quantised model first)"
            )
    return flat


def save_hf(
    directory: str | os.PathLike[str],
    config: LlamaConfig | GemmaConfig,
    params: Mapping[str, Any],
    *,
    max_shard_size: int | str = "5GB",
    hf_config: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``LlamaForCausalLM(config)`` or ``GemmaForCausalLM(config)`` params as a Hugging
    Face checkpoint directory.

    Args:
        directory: created if missing; earlier ``model*.safetensors`` files and index in it are
            replaced, other files (a tokenizer) kept. The write is atomic as a reader sees it:
            everything goes into a temporary sibling directory, is fsynced, and then takes
            ``directory``'s place in one rename (as :func:`jaxlora.save_peft` does), so a process
            killed at any point leaves the old checkpoint or the new one, never a mix of both.
        config: the model's config: a :class:`~jaxlora.models.llama.LlamaConfig` or a
            :class:`~jaxlora.models.gemma.GemmaConfig`.
        params: its params (every tensor :func:`~jaxlora.models.hf.llama.expected_tensors`, or
            :func:`~jaxlora.models.hf.gemma.expected_tensors`, names).
        max_shard_size: bytes per safetensors file (an int, or e.g. ``"500MB"``); more than one
            file adds ``model.safetensors.index.json``.
        hf_config: the base checkpoint's ``config.json`` dict, written instead of
            :func:`config_to_hf` (keeps its token ids and other fields); must describe ``config``.

    Raises:
        TypeError: for a ``config`` of another model family, a ``directory`` that is no path, or
            a params leaf that is not floating point (naming it).
        ValueError: for a ``directory`` that is an existing file, a params tree that does not
            fit ``config`` (naming the path), a bad ``max_shard_size``, or a config Hugging Face
            has no model for.
    """
    _check_arguments(directory, hf_config)
    validate.tree("params", params)
    tensors_of, to_hf, _ = _family(config)
    limit = _shard_size(max_shard_size)
    if hf_config is None:
        to_hf(config)  # fails early for a config Hugging Face has no model for
    specs = tensors_of(config)
    flat = _fitting_leaves(params, specs)
    dtypes = {str(np.dtype(leaf.dtype)) for leaf in flat.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    document = _hf_config(config, hf_config, dtype)
    sizes = {n: int(np.prod(s.target_shape)) * np.dtype(flat[s.path].dtype).itemsize
             for n, s in specs.items()}  # fmt: skip
    shards = _plan(sizes, limit)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    files = {}
    for file, shard in zip(names, shards, strict=True):
        files[file] = {name: (specs[name], flat[specs[name].path]) for name in shard}
    atomic.replace_directory(
        directory,
        lambda target: _write(target, files, document, sum(sizes.values())),
        owned=lambda name: _WRITTEN.fullmatch(name) is not None,
    )


def _write(target: str, files: Mapping[str, Mapping[str, Any]], document: dict, total: int) -> None:
    """Writes ``files`` (file name -> tensor name -> (spec, leaf)), the index when there is more
    than one file, and ``config.json`` into ``target``."""
    from safetensors.numpy import save_file

    for file, leaves in files.items():
        tensors = {}
        for name, (spec, leaf) in leaves.items():
            array = np.asarray(jax.device_get(leaf))
            tensors[name] = np.ascontiguousarray(
                array if spec.inverse is None else spec.inverse(array)
            )
        save_file(tensors, os.path.join(target, file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: file for file, leaves in files.items() for name in leaves},
        }
        with open(os.path.join(target, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(target, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, sort_keys=True)


def save_hf_merged(
    directory: str | os.PathLike[str],
    config: LlamaConfig | GemmaConfig,
    frozen: Mapping[str, Any],
    lora: LoraTree,
    lora_config: LoraConfig,
    *,
    max_shard_size: int | str = "5GB",
    hf_config: Mapping[str, Any] | None = None,
) -> None:
    """Merges the adapter into the base (:func:`jaxlora.merge`) and writes it with :func:`save_hf`.

    The merged weights keep the base's dtype (a bf16 base gives a bf16 checkpoint). Arguments as
    :func:`save_hf`; ``frozen``, ``lora`` and ``lora_config`` as for :func:`jaxlora.merge`.
    """
    _family(config)  # a config of another family fails before the merge
    _check_arguments(directory, hf_config)
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(
            f"`lora_config` must be a jaxlora.LoraConfig, got {type(lora_config).__name__}; pass "
            "the config the adapter was made with"
        )
    validate.tree("frozen", frozen)
    merged = merge(frozen, lora, lora_config)
    save_hf(directory, config, merged, max_shard_size=max_shard_size, hf_config=hf_config)
