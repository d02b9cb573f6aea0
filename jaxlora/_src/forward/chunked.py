"""A Dense layer on a kernel stored narrower than it computes in, cast a block of columns at a time.

A frozen bfloat16 output head under float32 compute is the case: ``nn.Dense`` promotes the whole
kernel to float32 first (XLA:CPU has no mixed bf16 × f32 matmul), and for a 32,000-token
vocabulary that copy is the largest buffer at the peak of a QLoRA training step. :func:`dense`
computes the same product block of output columns by block, casting one block at a time, in the
forward pass and again in the backward pass; only the stored kernel is kept between them. (The
blocks are unrolled rather than a ``lax.scan``: XLA:CPU gives a loop its own copy of the kernel.)
:func:`blocked_cast_interceptor` applies it to such layers; :func:`jaxlora.apply` enters it for a
base that holds narrow float kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.forward.adapted import read
from jaxlora._src.forward.ties import zero_from

#: Bytes of one cast block of columns: a full cast below this size is left to the layer.
DEFAULT_BLOCK_BYTES = 16 * 2**20
#: Blocks are unrolled; past this many, blocks grow instead (a 256k-token head stays compilable).
MAX_BLOCKS = 32


def _block_columns(n_in: int, n_out: int, itemsize: int, block_bytes: int) -> int:
    columns = max(1, block_bytes // (n_in * itemsize))
    return max(columns, -(-n_out // MAX_BLOCKS))


def _blocks(n_cols: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n_cols)) for start in range(0, n_cols, block)]


def _block(kernel: jax.Array, span: slice, anchor: jax.Array, transposed: bool) -> jax.Array:
    """The kernel's output columns ``span`` as an ``(in, len(span))`` block, read only once
    ``anchor`` exists. The start index gets a zero that depends on ``anchor``
    (``ties.zero_from``), so XLA neither slices every block up front nor shares the
    forward pass's blocks with the backward pass: either keeps a copy of the whole kernel
    alive."""
    zero = zero_from(anchor)
    start = span.start if zero is None else span.start + zero
    size = span.stop - span.start
    block = lax.dynamic_slice_in_dim(kernel, start, size, axis=0 if transposed else 1)
    return block.T if transposed else block


def _in_out(kernel: jax.Array, transposed: bool) -> tuple[int, int]:
    rows, columns = kernel.shape
    return (columns, rows) if transposed else (rows, columns)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense(
    x: jax.Array,
    kernel: jax.Array,
    block_columns: int,
    precision: Any = None,
    transposed: bool = False,
) -> jax.Array:
    """``x @ kernel.astype(x.dtype)`` over the last axis of ``x``, casting ``block_columns`` output
    columns of the 2-D ``kernel`` at a time (forward and backward pass); with ``transposed``,
    ``x @ kernel.T`` (an embedding table used as the output head), blocks of rows.

    Each block is read only once the previous block's result exists, so XLA runs the blocks one
    after another instead of casting them all up front.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = jnp.ones((2, 3)), jnp.arange(15.0).reshape(3, 5).astype(jnp.bfloat16)
        >>> dense(x, w, 2).tolist() == (x @ w.astype(jnp.float32)).tolist()
        True
        >>> dense(x, w.T, 2, transposed=True).tolist() == dense(x, w, 2).tolist()
        True
    """
    return _forward(x, kernel, block_columns, precision, transposed)[0]


def _forward(x, kernel, block_columns, precision, transposed):
    n_in, n_out = _in_out(kernel, transposed)
    rows = x.reshape(-1, n_in)
    parts, previous = [], rows
    for span in _blocks(n_out, block_columns):
        w = _block(kernel, span, previous, transposed).astype(x.dtype)
        previous = jnp.matmul(rows, w, precision=precision)
        parts.append(previous)
    y = jnp.concatenate(parts, axis=1)
    return y.reshape(x.shape[:-1] + (n_out,)), (x, kernel)


def _backward(block_columns, precision, transposed, residuals, dy):
    x, kernel = residuals
    n_in, n_out = _in_out(kernel, transposed)
    rows, grads = x.reshape(-1, n_in), dy.reshape(-1, n_out)
    dx = jnp.zeros(rows.shape, dy.dtype)
    for span in _blocks(n_out, block_columns):
        w = _block(kernel, span, dx if span.start else grads, transposed).astype(dy.dtype)
        dx = dx + jnp.matmul(grads[:, span], w.T, precision=precision)
    # Removed by dead-code elimination when the kernel is frozen, as it is here by design.
    if transposed:
        d_kernel = jnp.matmul(grads.T, rows, precision=precision)
    else:
        d_kernel = jnp.matmul(rows.T, grads, precision=precision)
    return dx.reshape(x.shape), d_kernel.astype(kernel.dtype)


dense.defvjp(_forward, _backward)


def _narrow(module: nn.Module, x: Any, kernel: Any, block_bytes: int):
    """``(x, compute dtype)`` in the layer's own promotion when ``kernel`` is a 2-D float stored
    narrower than the compute dtype and bigger than one block once cast, else None."""
    if not isinstance(kernel, jax.Array) or not isinstance(x, jax.Array) or kernel.ndim != 2:
        return None
    if not (jnp.issubdtype(kernel.dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)):
        return None
    x, _ = module.promote_dtype(x, kernel, dtype=module.dtype)
    if kernel.dtype.itemsize >= x.dtype.itemsize or kernel.size * x.dtype.itemsize <= block_bytes:
        return None
    return x, x.dtype


def _run_blocked(module: nn.Module, method: str, args, kwargs, block_bytes: int) -> Any:
    """The call in blocks, or None where it is not a plain Dense ``__call__`` / Embed ``attend``
    on a narrow kernel."""
    if len(args) != 1 or kwargs:
        return None
    if method == "attend" and isinstance(module, nn.Embed):
        found = _narrow(
            module, args[0], read(module.get_variable("params", "embedding")), block_bytes
        )
        if found is None:
            return None
        (x, dtype), table = found, read(module.get_variable("params", "embedding"))
        columns = _block_columns(table.shape[1], table.shape[0], dtype.itemsize, block_bytes)
        return dense(x, table, columns, None, True)
    if method != "__call__" or type(module) is not nn.Dense:
        return None
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None
    kernel = read(module.get_variable("params", "kernel"))
    found = _narrow(module, args[0], kernel, block_bytes)
    if found is None:
        return None
    x, dtype = found
    columns = _block_columns(kernel.shape[0], kernel.shape[1], dtype.itemsize, block_bytes)
    # jax's stubs lose a custom_vjp's return type (custom_vjp.__new__ is typed loosely).
    y = cast(jax.Array, dense(x, kernel, columns, module.precision))
    if module.use_bias:
        bias = module.get_variable("params", "bias").astype(dtype)
        y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def blocked_cast_interceptor(block_bytes: int | None = None) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs each plain ``nn.Dense`` call (and
    ``nn.Embed.attend``, a tied output head) whose stored kernel is narrower than its compute
    dtype and larger than ``block_bytes`` once cast through :func:`dense`. Outputs and gradients
    are the layer's. (A Dense with LoRA factors on the fused path never gets here; the other paths
    run its base product in blocks too.)

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> head, x = nn.Dense(1000, use_bias=False), jnp.ones((2, 64))
        >>> w = {"params": {"kernel": jnp.ones((64, 1000), jnp.bfloat16)}}
        >>> with nn.intercept_methods(blocked_cast_interceptor(block_bytes=2**16)):
        ...     y = head.apply(w, x)
        >>> bool(jnp.all(y == 64.0))
        True
    """
    if block_bytes is None:
        block_bytes = DEFAULT_BLOCK_BYTES
    if not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ValueError(f"`block_bytes` must be a positive int, got {block_bytes!r}")

    def intercept(next_fun, args, kwargs, context):
        y = _run_blocked(context.module, context.method_name, args, kwargs, block_bytes)
        return next_fun(*args, **kwargs) if y is None else y

    return intercept
