"""Quantised kernels back to floating point: one kernel (:func:`dequantize`) or a whole tree."""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxlora._src import validate
from jaxlora._src.quant.kernel import (
    NF4_LEVELS,
    QuantizedKernel,
    is_quantized,
    unblock,
    unpack_codes,
)


def dequantize(leaf: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The float kernel a :class:`QuantizedKernel` stands for (in its original dtype by default;
    ``dtype`` must be floating: a TypeError otherwise).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.quant import quantize_kernel
        >>> w = jnp.linspace(-1, 1, 256).reshape(16, 16)
        >>> bool(jnp.abs(dequantize(quantize_kernel(w, "nf4")) - w).max() < 0.16)
        True
    """
    if not isinstance(leaf, QuantizedKernel):
        raise TypeError(f"`leaf` must be a QuantizedKernel, got {type(leaf).__name__}")
    dtype = validate.float_dtype("dtype", leaf.dtype if dtype is None else dtype)
    if leaf.method == "int8":
        return (leaf.codes.astype(jnp.float32) * leaf.scale).astype(dtype)
    stack = leaf.stack_shape
    codes = unpack_codes(leaf.codes)
    if leaf.method == "nf4":
        absmax = leaf.scale
        if leaf.scale_scale is not None:  # double-quantised: scale_mean is stored with it
            mean = cast(jax.Array, leaf.scale_mean)
            grouped = leaf.scale.astype(jnp.float32) * leaf.scale_scale + mean
            absmax = grouped.reshape(stack + (-1,))[..., : codes.shape[-2]]
        values = jnp.asarray(NF4_LEVELS, jnp.float32)[codes] * absmax[..., None]
    else:
        d, m = leaf.scale.astype(jnp.float32), cast(jax.Array, leaf.zero).astype(jnp.float32)
        values = d[..., None] * codes.astype(jnp.float32) + m[..., None]
    shape = leaf.kernel_shape[::-1] if leaf.transposed else leaf.kernel_shape
    out = unblock(values, stack, shape)
    return (jnp.swapaxes(out, -1, -2) if leaf.transposed else out).astype(dtype)


def dequantize_tree(params: Any, dtype: Any = None) -> Any:
    """``params`` with every :class:`QuantizedKernel` replaced by its float kernel.

    Raises:
        TypeError: for a ``dtype`` that is not floating (checked even when no leaf is
            quantised).
    """
    if dtype is not None:
        validate.float_dtype("dtype", dtype)
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )
