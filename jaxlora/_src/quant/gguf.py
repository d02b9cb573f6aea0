"""GGUF Q4_1 tensors kept 4-bit: llama.cpp's blocks as ``jaxlora.quant.QuantizedKernel`` leaves.

The Llama GGUF file loader built on them lives with the reference models
(:func:`jaxlora.models.load_gguf_llama`): the library never imports model code."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora._src import validate
from jaxlora._src.quant.kernel import Q4_1_BLOCK, QuantizedKernel


def from_gguf_q4_1(
    raw: np.ndarray, shape: Sequence[int], dtype: Any = "float32"
) -> QuantizedKernel:
    """Keeps a GGUF Q4_1 tensor 4-bit, as the flax kernel ``(in, out)`` it stands for.

    Args:
        raw: the tensor's bytes as ``gguf.GGUFReader`` gives them (``tensor.data``: uint8,
            ``(out, in // 32 * 20)``; each 20-byte block is ``d`` f16, ``m`` f16, 16 code bytes).
        shape: the flax kernel shape ``(in, out)``.
        dtype: what :func:`~jaxlora.quant.dequantize` returns.
    """
    shape = validate.sequence("shape", shape)
    if len(shape) != 2:
        raise ValueError(f"`shape` must be the 2-D flax kernel shape (in, out), got {shape}")
    n_in, n_out = (validate.positive_int("shape", n) for n in shape)
    validate.array_like("raw", raw, integer=True, nonempty=True)
    validate.float_dtype("dtype", dtype)
    raw = np.asarray(raw, np.uint8)
    if n_in % Q4_1_BLOCK or raw.size != n_out * n_in // Q4_1_BLOCK * 20:
        raise ValueError(
            f"`raw` of {raw.size} bytes does not hold Q4_1 blocks of a kernel of shape "
            f"{(n_in, n_out)}: expected {n_out * n_in // Q4_1_BLOCK * 20} bytes and `in` a "
            f"multiple of {Q4_1_BLOCK}"
        )
    blocks = raw.reshape(-1, 20)
    d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16)[:, 0]
    m = np.ascontiguousarray(blocks[:, 2:4]).view(np.float16)[:, 0]
    return QuantizedKernel(
        jnp.asarray(blocks[:, 4:]), jnp.asarray(d), jnp.asarray(m), method="q4_1",
        kernel_shape=(n_in, n_out), dtype=jnp.dtype(dtype).name, layout="io",
        block_size=Q4_1_BLOCK, transposed=True,
    )  # fmt: skip


def permute_rows(leaf: QuantizedKernel, fn: Callable[[np.ndarray], np.ndarray]) -> QuantizedKernel:
    """Applies a row permutation ``fn`` (on GGUF's ``(out, ...)`` rows) to a transposed Q4_1 leaf,
    e.g. ``jaxlora.models.llama.weights.gguf_rows_to_hf`` for Hugging Face's q/k row order."""
    if not isinstance(leaf, QuantizedKernel):
        raise validate.fail_type("leaf", "a QuantizedKernel (from `from_gguf_q4_1`)", leaf)
    validate.function("fn", fn)
    if leaf.zero is None:
        raise ValueError(f"`leaf` must be a Q4_1 QuantizedKernel, got method {leaf.method!r}")
    n_out = leaf.kernel_shape[1]
    parts = (leaf.codes, leaf.scale, leaf.zero)
    arrays = [np.asarray(x).reshape(n_out, -1) for x in parts]
    codes, d, m = (jnp.asarray(fn(x).reshape(-1, *np.shape(y)[1:])) for x, y in
                   zip(arrays, parts, strict=True))  # fmt: skip
    return dataclasses.replace(leaf, codes=codes, scale=d, zero=m)
