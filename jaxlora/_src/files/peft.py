"""Hugging Face PEFT's adapter format, both ways: ``adapter_config.json`` +
``adapter_model.safetensors``.

:func:`save_peft` writes an adapter that PEFT loads with ``PeftModel.from_pretrained``;
:func:`load_peft` reads one back, turning PEFT's ``target_modules`` / ``rank_pattern`` /
``alpha_pattern`` rules into a :class:`~jaxlora.LoraConfig` that names the Flax paths. The config
translation is ``peft_config``; where each tensor goes, and in what shape, ``peft_layout``. DoRA
adapters (a Θ with ``lora_magnitude`` leaves, see :mod:`jaxlora.variants`) are PEFT's
``use_dora: true``. Only numpy and ``safetensors`` are needed; torch is never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.files import atomic
from jaxlora._src.files.peft_checks import (
    check_directory,
    check_document,
    check_frozen,
    check_layouts,
    check_module_name,
    check_save_args,
)
from jaxlora._src.files.peft_config import config_from_peft, default_module_name, peft_config
from jaxlora._src.files.peft_layout import ModuleName, check_tensors, tensor_entries
from jaxlora._src.tree.fit import check_fits, expected_adapter
from jaxlora._src.types import LoraTree, Params
from jaxlora._src.variants import base as variants

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: safetensors metadata key of the sha256 over every tensor jaxlora wrote (PEFT ignores it).
DIGEST_KEY = "jaxlora_sha256"


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}:{array.dtype.str}{array.shape}:".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _write(directory: str, document: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
    metadata = {"format": "pt", DIGEST_KEY: _digest(tensors)}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata=metadata)


def save_peft(
    directory: str | os.PathLike[str],
    lora: LoraTree,
    config: LoraConfig,
    frozen: Params,
    *,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes Θ as a PEFT adapter: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Load it in PyTorch with ``peft.PeftModel.from_pretrained(torch_model, directory)``. A Θ with
    ``lora_magnitude`` leaves (``jaxlora.split(..., variant="dora")``) is written as a DoRA adapter
    (``use_dora: true``, each magnitude as ``<module>.lora_magnitude_vector``).

    The write is atomic: both files go into a temporary sibling directory, are fsynced, and the
    sibling then takes ``directory``'s place in one rename, so a process killed at any point
    leaves either the old complete adapter or the new one. Other files already in ``directory``
    are kept (hard-linked into the new one).

    Args:
        directory: created if missing; the two files are replaced.
        lora: the adapter Θ.
        config: the config Θ was made with.
        frozen: the base params (arrays or ``jax.ShapeDtypeStruct``), for the kernels' layouts.
        module_name: Flax module path and layer index -> PyTorch module name.
        base_model_name_or_path: recorded in the config for PEFT (e.g. a hub id).

    Raises:
        ValueError: when Θ does not fit ``frozen`` (names every path with both shapes; a DoRA Θ
            needs a magnitude on every target), when a stacked module gets no name, or when two
            leaves map to one PEFT key.
    """
    check_directory(directory)
    check_save_args(lora, module_name, base_model_name_or_path)
    check_frozen(frozen)
    variant = variants.adapter_variant(lora)
    use_dora = variant == "dora"
    expected = expected_adapter(frozen, config, variant, caller="save_peft")
    check_fits(paths.by_path(lora), paths.by_path(expected), "`lora`")
    tensors = {}
    for entry in tensor_entries(frozen, config, module_name, variant):
        array = np.asarray(paths.get_in(lora, entry.lora_keys))[entry.index]
        tensors[entry.key] = np.ascontiguousarray(entry.to_peft(array))
    document = peft_config(config, frozen, module_name, base_model_name_or_path, use_dora)
    atomic.replace_directory(directory, lambda tmp: _write(tmp, document, tensors))


def _read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    with open(path) as f:
        text = f.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{path}` is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"`{path}` must hold a JSON object, got {type(document).__name__}")
    check_document(document, path)
    return document


def _read_tensors(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file, all floating point, checked against jaxlora's digest
    where the file has one."""
    from safetensors import safe_open

    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no `{WEIGHTS_FILE}` in `{os.fspath(directory)}`: `{path}`")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, and OSError
        raise ValueError(
            f"cannot read `{path}` (truncated or not a safetensors file): {err}"
        ) from None
    for key, tensor in tensors.items():
        # jnp.issubdtype knows ml_dtypes' bfloat16 and float8 types; np.issubdtype calls them
        # not floating.
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise TypeError(
                f"the tensor `{key}` in `{path}` is {tensor.dtype}; adapter tensors must be "
                "floating point (an integer tensor is not a LoRA weight)"
            )
    if DIGEST_KEY in metadata and _digest(tensors) != metadata[DIGEST_KEY]:
        raise ValueError(
            f"`{path}` is corrupt: the sha256 of its tensors differs from the one jaxlora stored "
            "when it wrote the file (changed or damaged bytes)"
        )
    return tensors


def load_peft(
    directory: str | os.PathLike[str],
    frozen: Params,
    *,
    module_name: ModuleName = default_module_name,
    layouts: Mapping[str, str] | None = None,
    dtype: str = "float32",
) -> tuple[LoraTree, LoraConfig]:
    """Reads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    A DoRA adapter (``use_dora: true``) gives a Θ with ``lora_magnitude`` leaves, which
    :func:`jaxlora.merge` folds as DoRA.

    Unlike PEFT, which warns and carries on, every missing, unexpected or mis-shaped tensor is an
    error: an adapter that silently loads nothing trains or serves the base model.

    Args:
        directory: the adapter directory (what ``PeftModel.save_pretrained`` wrote).
        frozen: the Flax base params (arrays or ``jax.ShapeDtypeStruct``) the adapter belongs to.
        module_name: Flax module path and layer index -> PyTorch module name.
        layouts: jaxlora layouts for N-D or stacked kernels (see :class:`~jaxlora.LoraConfig`).
        dtype: dtype of the factors A and B (and DoRA magnitudes) in Θ.

    Returns:
        ``(lora, config)``, ready for :func:`jaxlora.merge` or further training.

    Raises:
        FileNotFoundError: when either file is missing.
        TypeError: for a tensor that is not floating point (names its key).
        ValueError: for unsupported adapters, for any key that does not fit ``frozen``, for
            invalid JSON or an unreadable (e.g. truncated) safetensors file (names the file), and
            for tensors whose sha256 is not the one jaxlora stored when it wrote the file.
    """
    check_directory(directory)
    check_module_name(module_name)
    check_layouts(layouts)
    check_frozen(frozen)
    source = f"the PEFT adapter in `{os.fspath(directory)}`"
    document = _read_config(directory)
    tensors = _read_tensors(directory)
    config = config_from_peft(
        document, frozen, module_name=module_name, layouts=layouts, dtype=dtype, source=source
    )
    variant = "dora" if document.get("use_dora", False) else "lora"
    entries = tensor_entries(frozen, config, module_name, variant)
    check_tensors(entries, tensors, source)
    expected = expected_adapter(frozen, config, variant, caller="load_peft")
    arrays: dict[tuple[Any, ...], np.ndarray] = {}
    for entry in entries:
        if entry.lora_keys not in arrays:
            like = paths.get_in(expected, entry.lora_keys)
            arrays[entry.lora_keys] = np.zeros(like.shape, like.dtype)
        target = arrays[entry.lora_keys]
        target[entry.index] = entry.from_peft(np.asarray(tensors[entry.key])).astype(target.dtype)
    lora: LoraTree = {}
    for keys, array in arrays.items():
        paths.set_in(lora, keys, jnp.asarray(array))
    return lora, config
