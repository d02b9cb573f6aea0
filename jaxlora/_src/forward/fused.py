"""The fast path of a dense layer with LoRA: ``x·W + bias + s·(drop(x)·A)·B`` as one ``custom_vjp``.

The linen ``Dense`` / ``DenseGeneral`` and NNX ``Linear`` / ``LinearGeneral`` calls whose weight
is adapted run through :func:`dense` whenever their maths is a plain contraction of the input's
trailing axes (the usual case, and every projection of Flax's own attention modules): the N-D
layer is viewed as a 2-D one, ``(rows, prod(in)) · (prod(in), prod(out))``.

Why a ``custom_vjp``: autodiff of the N-D form contracts the batch and sequence axes together for
each weight-gradient, which XLA:CPU compiles far worse inside a training step. Here every
weight-gradient (``dA = drop(x)ᵀ·dh``, ``dB = hᵀ·dy``) is one GEMM over a single row axis, no
``d×k`` temporary is formed, and the frozen kernel's own cotangent, computed for completeness, is
removed by XLA's dead-code elimination. Measured on the benchmark GPT (all-linear, r 8): 0.89x
of full fine-tuning by autodiff, 0.64x this way (``experiments/results/optimisation_notes.md``).

LoRA dropout acts on the LoRA input only. Its keep-mask is drawn once, outside, and passed in as a
boolean array: the forward applies it, the backward reuses the same mask (stored as one byte per
entry) for ``dA`` and for the LoRA part of ``dx``.

Dtypes: the layer's contraction runs in ``x``'s dtype (a narrower stored kernel, e.g. a bfloat16
base under float32 compute, is cast inside the forward and again inside the backward, so only the
stored kernel is kept between them); the low-rank term runs in the factors' dtype and is cast to
the output's, as on the general path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.forward import ties
from jaxlora._src.forward.dropout_mask import apply_mask as apply_mask
from jaxlora._src.forward.dropout_mask import keep_mask as keep_mask

_ENABLED = contextvars.ContextVar("jaxlora_fused_enabled", default=True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, adapted dense layers take the general factored path (layer call plus
    separate low-rank term, differentiated by autodiff): the reference the fast path is tested
    against, and a switch for anyone bisecting a numerical difference."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether the fast path may be taken (see :func:`disabled`)."""
    return _ENABLED.get()


def _rows(t: jax.Array) -> jax.Array:
    return t.reshape(-1, t.shape[-1])


def _contract_rows(u: jax.Array, v: jax.Array, precision: Any) -> jax.Array:
    """``uᵀ·v`` over the shared row axis of two 2-D matrices."""
    return lax.dot_general(u, v, (((0,), (0,)), ((), ())), precision=precision)


def _varying(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside it)."""
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    return getattr(axis_type, "varying", frozenset())


def _like(cotangent: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """``cotangent`` with ``primal``'s manual-axis type, as autodiff would give it inside
    ``shard_map``: summed over the axes only the cotangent varies over (the transpose of the
    implicit broadcast of a replicated input, e.g. a frozen kernel or the factors under data
    parallelism), marked varying over the axes only the primal varies over."""
    if cotangent is None or primal is None:
        return cotangent
    extra, missing = _varying(cotangent) - _varying(primal), _varying(primal) - _varying(cotangent)
    if extra:
        cotangent = lax.psum(cotangent, tuple(sorted(extra)))
    if missing:
        cotangent = lax.pcast(cotangent, tuple(sorted(missing)), to="varying")
    return cotangent


_LAST_FIRST = (((1,), (0,)), ((), ()))  # (m, k)·(k, n)
_LAST_LAST = (((1,), (1,)), ((), ()))  # (m, n)·(k, n)ᵀ


def _compute_kernel(kernel: jax.Array, like: jax.Array) -> jax.Array:
    """``kernel`` in ``like``'s dtype; a cast copy is made to depend on ``like``, so that XLA can
    neither hoist it to the start of the step nor share the forward's copy with the backward."""
    if kernel.dtype == like.dtype:
        return kernel
    return ties.tie_to(kernel, like).astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    a: jax.Array,
    b: jax.Array,
    keep: jax.Array | None,
    scale: float,
    rate: float,
    precision: Any,
    out_first: bool = False,
    kernel_left: bool = False,
) -> jax.Array:
    """``x·W + bias + s·(drop(x)·A)·B`` over the last axis of ``x``, with a 2-D backward.

    Args:
        x: the layer input ``(..., k)`` in the compute dtype.
        kernel: W ``(k, n)`` (``(n, k)`` with ``out_first``: PyTorch's and Equinox's ``weight``,
            contracted as stored, never transposed), in ``x``'s dtype or a narrower float type.
        bias: ``(n,)`` in ``x``'s dtype, or None.
        a: A ``(k, r)``; b: B ``(r, n)``, both in one (the adapter's) dtype.
        keep: the dropout keep-mask (:func:`keep_mask`), ``x``'s shape, or None for no dropout.
        scale: s = alpha / r (or the rsLoRA scale).
        rate: the dropout rate ``keep`` was drawn with (unused without ``keep``).
        precision: the layer's ``precision``.
        out_first: whether ``kernel`` is stored outputs first, ``(n, k)``.
        kernel_left: the forward computes ``x·W`` as ``(W·xᵀ)ᵀ``, as an op with the kernel on its
            left does (a vmapped Equinox Linear), so that B = 0 gives that op's bits.

    Returns:
        ``(..., n)`` in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w, a, b = jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3))
        >>> dense(x, w, None, a, b, None, 0.5, 0.0, None)
        Array([[6., 6., 6.],
               [6., 6., 6.]], dtype=float32)
    """
    args = (scale, rate, precision, out_first, kernel_left)
    return _dense_fwd(x, kernel, bias, a, b, keep, *args)[0]


def _dense_fwd(x, kernel, bias, a, b, keep, scale, rate, precision, out_first, kernel_left):
    x2, k_axis = _rows(x), 1 if out_first else 0
    w = _compute_kernel(kernel, x2)
    if kernel_left:  # the op's own product: x not flattened, the kernel's rows first
        y = lax.dot_general(w, x, (((k_axis,), (x.ndim - 1,)), ((), ())), precision=precision)
        y = jnp.moveaxis(y, 0, -1).reshape(x2.shape[0], -1)
    else:
        y = lax.dot_general(x2, w, (((1,), (k_axis,)), ((), ())), precision=precision)
    x_lora = apply_mask(_rows(x.astype(a.dtype)), None if keep is None else _rows(keep), rate)
    h = lax.dot_general(x_lora, a, _LAST_FIRST, precision=precision) * jnp.asarray(scale, a.dtype)
    y = y + lax.dot_general(h, b, _LAST_FIRST, precision=precision).astype(y.dtype)
    if bias is not None:
        y = y + bias.reshape(1, -1)
    y = y.reshape(x.shape[:-1] + (kernel.shape[0 if out_first else 1],))
    return y, (x, kernel, a, h, b, bias, keep)


def _dense_bwd(scale, rate, precision, out_first, kernel_left, residuals, dy):
    x, kernel, a, h, b, bias, keep = residuals
    dy2 = _rows(dy)
    dy_lora = dy2.astype(b.dtype)
    dh = lax.dot_general(dy_lora, b, _LAST_LAST, precision=precision)
    dh = dh * jnp.asarray(scale, dh.dtype)
    dims = _LAST_FIRST if out_first else _LAST_LAST
    dx = lax.dot_general(dy2, _compute_kernel(kernel, dy2), dims, precision=precision)
    dx_lora = lax.dot_general(dh, a, _LAST_LAST, precision=precision)
    keep2 = None if keep is None else _rows(keep)
    dx = dx + apply_mask(dx_lora, keep2, rate).astype(dx.dtype)
    x_lora = apply_mask(_rows(x.astype(a.dtype)), keep2, rate)
    rows_in_out = (dy2, _rows(x)) if out_first else (_rows(x), dy2)
    d_kernel = _contract_rows(*rows_in_out, precision).astype(kernel.dtype)
    d_a = _contract_rows(x_lora, dh, precision)
    d_b = _contract_rows(h, dy_lora, precision)
    d_bias = None if bias is None else jnp.sum(dy2, axis=0).astype(bias.dtype)
    cotangents = (dx.reshape(x.shape), d_kernel, d_bias, d_a, d_b)
    primals = (x, kernel, bias, a, b)
    return (*(_like(c, p) for c, p in zip(cotangents, primals, strict=True)), None)


dense.defvjp(_dense_fwd, _dense_bwd)


def trailing_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    a: jax.Array,
    b: jax.Array,
    keep: jax.Array | None,
    scale: float,
    rate: float,
    precision: Any,
    n_in: int,
    out_first: bool = False,
    kernel_left: bool = False,
) -> jax.Array:
    """:func:`dense` for a kernel ``in_shape + out_shape`` (``out_shape + in_shape`` with
    ``out_first``) contracting the last ``n_in`` axes of ``x`` (``DenseGeneral`` / ``LinearGeneral``
    with trailing ``axis`` and no batch axes; an Equinox ``Linear``).

    ``a`` is ``in_shape + (r,)``, ``b`` ``(r,) + out_shape``, ``bias`` ``out_shape`` or None; the
    result is ``x.shape[:-n_in] + out_shape``.
    """
    split = kernel.ndim - n_in if out_first else n_in
    in_shape, out_shape = kernel.shape[:split], kernel.shape[split:]
    if out_first:
        in_shape, out_shape = out_shape, in_shape
    k, n, r = math.prod(in_shape), math.prod(out_shape), a.shape[-1]
    lead = x.shape[: x.ndim - n_in]
    flat = dense(
        x.reshape(lead + (k,)),
        kernel.reshape((n, k) if out_first else (k, n)),
        None if bias is None else bias.reshape(n),
        a.reshape(k, r),
        b.reshape(r, n),
        None if keep is None else keep.reshape(lead + (k,)),
        scale,
        rate,
        precision,
        out_first,
        kernel_left,
    )
    # jax's stubs lose a custom_vjp's return type (custom_vjp.__new__ is typed loosely).
    return cast(jax.Array, flat).reshape(lead + out_shape)


def layer_call(
    x: Any,
    kernel: Any,
    bias: Any,
    promote: Any,
    a: jax.Array,
    b: jax.Array,
    keep: jax.Array | None,
    scale: float,
    rate: float,
    precision: Any,
    n_in: int,
) -> jax.Array | None:
    """A dense layer's call with its LoRA term through :func:`trailing_dense`, or None where the
    fast path does not apply (it is disabled, the stored kernel or bias is not a plain array, the
    input's trailing axes are not the kernel's input axes, input and kernel do not share a dtype
    after the layer's promotion, or the two factors differ in dtype): the caller then takes the
    general path, where the layer itself raises on a misshapen input.

    ``promote(x, kernel, bias)`` is the layer's own dtype promotion, so the result is what the
    layer plus the separate low-rank term compute.
    """
    if not enabled() or not isinstance(kernel, jax.Array) or a.dtype != b.dtype:
        return None
    if bias is not None and not isinstance(bias, jax.Array):
        return None
    if jnp.shape(x)[max(jnp.ndim(x) - n_in, 0) :] != tuple(kernel.shape[:n_in]):
        return None
    x, promoted, bias = promote(jnp.asarray(x), kernel, bias)
    if x.dtype != promoted.dtype:
        return None
    if not (jnp.issubdtype(kernel.dtype, jnp.floating) and kernel.dtype.itemsize < x.itemsize):
        kernel = promoted  # else: cast inside, so only the narrow kernel is kept for the backward
    return trailing_dense(x, kernel, bias, a, b, keep, scale, rate, precision, n_in)
