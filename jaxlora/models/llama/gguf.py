"""A Llama GGUF file loaded with its Q4_1 kernels kept 4-bit (:mod:`jaxlora.quant`): the QLoRA base
straight from llama.cpp's blocks, never dequantised in full."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from jaxlora import quant
from jaxlora._src import validate
from jaxlora.models.io.gguf_reader import GGUFFile
from jaxlora.models.llama import weights as lw
from jaxlora.models.llama.config import LlamaConfig

__all__ = ["load_gguf_llama"]


def load_gguf_llama(
    path: str | None = None, hf_layout: bool = False
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Llama GGUF file (default: SmolLM2-135M-Instruct) keeping Q4_1 kernels 4-bit.

    Like ``jaxlora.models.llama.weights.load_smollm2``, but every Q4_1 weight becomes a
    :class:`~jaxlora.quant.QuantizedKernel` holding the file's own blocks (dequantised on the fly by
    :func:`jaxlora.quant.dequantize`, or layer by layer inside :func:`jaxlora.apply`); other
    tensors are read as float32.

    Returns:
        ``(LlamaConfig, params)``.
    """
    from gguf import GGMLQuantizationType

    if path is not None:
        validate.path("path", path)
    validate.boolean("hf_layout", hf_layout)
    file = GGUFFile(lw.smollm2_path() if path is None else path)
    config = lw.config_from_gguf(file)
    flat: dict[tuple[str, ...], Any] = {}
    for name in file.tensor_names:
        key = lw.flax_key(name)
        if key is None:
            raise ValueError(f"GGUF tensor `{name}` of `{file.path}` has no place in the model")
        info = file.raw_tensor(name)
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(key[-2])
        rows = (
            functools.partial(lw.gguf_rows_to_hf, num_heads=heads) if hf_layout and heads else None
        )
        if info.tensor_type == GGMLQuantizationType.Q4_1 and key[-1] == "kernel":
            n_out, n_in = (int(n) for n in reversed(info.shape))
            leaf = quant.from_gguf_q4_1(info.data, (n_in, n_out))
            leaf = quant.permute_rows(leaf, rows) if rows else leaf
        else:
            weight = file.tensor(name)
            weight = rows(weight) if rows else weight
            leaf = jnp.asarray(weight.T if key[-1] == "kernel" else weight)
        flat[key] = leaf
    if hf_layout:
        config = dataclasses.replace(config, rope_interleaved=False)
    return config, traverse_util.unflatten_dict(flat)
