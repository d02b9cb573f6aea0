"""A Dense layer on a kernel stored narrower than it computes in, cast a block of columns at a time.

A frozen bfloat16 output head under float32 compute is the case: ``nn.Dense`` promotes the whole
kernel to float32 first (XLA:CPU has no mixed bf16 × f32 matmul), and for a 32,000-token
vocabulary that copy is the largest buffer at the peak of a QLoRA training step. :func:`dense`
computes the same product block of output columns by block, casting one block at a time, in the
forward pass and again in the backward pass; only the stored kernel is kept between them. (The
blocks are unrolled rather than a ``lax.scan``: XLA:CPU gives a loop its own copy of the kernel.)
:func:`interceptor` applies it to such layers; :func:`jaxlora.apply` enters it for a base that
holds narrow float kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxlora.types import LORA_A

__all__ = ["dense", "interceptor", "DEFAULT_BLOCK_BYTES"]

#: Bytes of one cast block of columns: a full cast below this size is left to the layer.
DEFAULT_BLOCK_BYTES = 16 * 2**20


def _blocks(n_cols: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n_cols)) for start in range(0, n_cols, block)]


def _block(kernel: jax.Array, columns: slice, anchor: jax.Array) -> jax.Array:
    """``kernel[:, columns]``, read only once ``anchor`` exists. The start index gets a zero that
    depends on ``anchor`` (``x > inf`` is false even for NaN), so XLA neither slices every block up
    front nor shares the forward pass's blocks with the backward pass: either keeps a copy of the
    whole kernel alive."""
    zero = (jnp.ravel(anchor)[0] > jnp.inf).astype(jnp.int32)
    size = columns.stop - columns.start
    return lax.dynamic_slice_in_dim(kernel, columns.start + zero, size, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, kernel: jax.Array, block_columns: int, precision: Any = None) -> jax.Array:
    """``x @ kernel.astype(x.dtype)`` over the last axis of ``x``, casting ``block_columns`` output
    columns of the 2-D ``kernel`` at a time (forward and backward pass).

    Each block is read only once the previous block's result exists, so XLA runs the blocks one
    after another instead of casting them all up front.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = jnp.ones((2, 3)), jnp.arange(15.0).reshape(3, 5).astype(jnp.bfloat16)
        >>> dense(x, w, 2).tolist() == (x @ w.astype(jnp.float32)).tolist()
        True
    """
    return _forward(x, kernel, block_columns, precision)[0]


def _forward(x, kernel, block_columns, precision):
    rows = x.reshape(-1, kernel.shape[0])
    parts, previous = [], rows
    for columns in _blocks(kernel.shape[1], block_columns):
        w = _block(kernel, columns, previous).astype(x.dtype)
        previous = jnp.matmul(rows, w, precision=precision)
        parts.append(previous)
    y = jnp.concatenate(parts, axis=1)
    return y.reshape(x.shape[:-1] + (kernel.shape[1],)), (x, kernel)


def _backward(block_columns, precision, residuals, dy):
    x, kernel = residuals
    rows, grads = x.reshape(-1, kernel.shape[0]), dy.reshape(-1, kernel.shape[1])
    dx = jnp.zeros(rows.shape, dy.dtype)
    for columns in _blocks(kernel.shape[1], block_columns):
        w = _block(kernel, columns, dx if columns.start else grads).astype(dy.dtype)
        dx = dx + jnp.matmul(grads[:, columns], w.T, precision=precision)
    # Removed by dead-code elimination when the kernel is frozen, as it is here by design.
    d_kernel = jnp.matmul(rows.T, grads, precision=precision).astype(kernel.dtype)
    return dx.reshape(x.shape), d_kernel


dense.defvjp(_forward, _backward)


def _narrow_dense(module: nn.Module, args, kwargs, block_bytes: int):
    """``(x, kernel, compute dtype)`` when ``module`` is a plain Dense call whose stored kernel is
    narrower than the compute dtype and bigger than one block once cast, else None."""
    if type(module) is not nn.Dense or module.dot_general is not None:
        return None
    if module.dot_general_cls is not None or len(args) != 1 or kwargs:
        return None
    if module.has_variable("params", LORA_A):
        return None
    kernel = module.get_variable("params", "kernel")
    x = args[0]
    if not isinstance(kernel, jax.Array) or not isinstance(x, jax.Array) or kernel.ndim != 2:
        return None
    if not (jnp.issubdtype(kernel.dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)):
        return None
    x, _ = module.promote_dtype(x, kernel, dtype=module.dtype)  # the layer's own promotion
    dtype = x.dtype
    if kernel.dtype.itemsize >= dtype.itemsize or kernel.size * dtype.itemsize <= block_bytes:
        return None
    return x, kernel, dtype


def interceptor(block_bytes: int | None = None) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs each plain ``nn.Dense`` without
    LoRA factors whose stored kernel is narrower than its compute dtype (and larger than
    ``block_bytes`` once cast) through :func:`dense`. Outputs and gradients are the layer's.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> head, x = nn.Dense(1000, use_bias=False), jnp.ones((2, 64))
        >>> w = {"params": {"kernel": jnp.ones((64, 1000), jnp.bfloat16)}}
        >>> with nn.intercept_methods(interceptor(block_bytes=2**16)):
        ...     y = head.apply(w, x)
        >>> bool(jnp.all(y == 64.0))
        True
    """
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES
    if not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ValueError(f"`block_bytes` must be a positive int, got {block_bytes!r}")

    def intercept(next_fun, args, kwargs, context):
        found = None
        if context.method_name == "__call__":
            found = _narrow_dense(context.module, args, kwargs, block_bytes)
        if found is None:
            return next_fun(*args, **kwargs)
        x, kernel, dtype = found
        module = context.module
        columns = max(1, block_bytes // (kernel.shape[0] * dtype.itemsize))
        y = dense(x, kernel, columns, module.precision)
        if module.use_bias:
            bias = module.get_variable("params", "bias").astype(dtype)
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y

    return intercept
