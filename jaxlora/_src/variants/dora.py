"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as a variant (:mod:`.base`).

DoRA trains a magnitude ``m`` per output column beside the LoRA factors and normalises the
direction: ``W' = m · V / ‖V‖_c`` with ``V = W + s·A·B`` and ``‖V‖_c`` the norm of each output
column over the input (and window) axes. As the DoRA paper recommends (section 4.3), the norm is
treated as a constant in the backward pass (``jax.lax.stop_gradient``), which is also what PEFT
does. ``m`` lives in Θ as ``lora_magnitude`` beside ``lora_a`` / ``lora_b``, with the shape
``stack + output`` (PEFT names it ``lora_magnitude_vector``; for a Dense kernel both are
``(out_features,)``), and starts at ``‖W‖_c``, so a fresh DoRA adapter changes nothing.

``jaxlora.split(..., variant="dora")`` makes a DoRA adapter; ``jaxlora.merge`` folds it into the
kernel (:func:`dora_kernel`); ``jaxlora.apply`` runs it merged, or factored, where each layer
multiplies its bias-free output by :func:`magnitude_factor`. A merged DoRA kernel cannot be
unmerged: the column norms of ``V`` are lost in the merge.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import validate
from jaxlora._src.config.targets import EMBEDDING
from jaxlora._src.quant.dequantize import dequantize
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.types import LORA_MAGNITUDE
from jaxlora._src.variants.base import FileEntry, Variant
from jaxlora._src.variants.lora import delta

#: PEFT's name for the magnitude (``<module>.lora_magnitude_vector`` in adapter files).
PEFT_MAGNITUDE = "lora_magnitude_vector"


def column_norm(v: jax.Array, n_stack: int, n_out: int) -> jax.Array:
    """The float32 norm of each output column: over every axis but the stack and output axes,
    kept as size-1 axes so that it broadcasts against ``v``.

    Example:
        >>> import jax.numpy as jnp
        >>> column_norm(jnp.full((4, 3), 2.0), 0, 1)
        Array([[4., 4., 4.]], dtype=float32)
    """
    validate.array("v", v, floating=True, nonempty=True)
    validate.integer("n_stack", n_stack, minimum=0)
    validate.integer("n_out", n_out, minimum=1, maximum=v.ndim - n_stack)
    axes = tuple(range(n_stack, v.ndim - n_out))
    v32 = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v32 * v32, axis=axes, keepdims=True))


def _check_dora(w: Any, a: Any, b: Any, m: Any, scale: Any, n_stack: Any) -> None:
    """An error naming the wrong argument of :func:`dora_kernel` / :func:`magnitude_factor`."""
    for name, value in (("w", w), ("a", a), ("b", b), ("m", m)):
        validate.array(name, value, floating=True, min_ndim=1)
    if not validate.is_traced(scale):
        validate.number("scale", scale, above=0.0)
    validate.integer("n_stack", n_stack, minimum=0)
    if a.ndim < n_stack + 2 or b.ndim < n_stack + 2:
        raise ValueError(
            f"`a` {tuple(a.shape)} and `b` {tuple(b.shape)} must each have the {n_stack} stacked "
            "axes, the rank axis and at least one input (a) or output (b) axis"
        )
    expected = tuple(a.shape[:-1]) + tuple(b.shape[n_stack + 1 :])
    if tuple(w.shape) != expected:
        raise ValueError(f"`w` must have shape {expected} (from `a` and `b`), got {tuple(w.shape)}")
    columns = tuple(b.shape[:n_stack]) + tuple(b.shape[n_stack + 1 :])
    if math.prod(m.shape) != math.prod(columns):
        raise ValueError(
            f"`m` must hold one magnitude per output column, shape {columns}, got {tuple(m.shape)}"
        )


def magnitude_factor(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, scale: float, n_stack: int = 0
) -> jax.Array:
    """``m / sg(‖W + s·A·B‖_c)``, shaped ``stack + output``: the factor a factored DoRA layer
    multiplies its bias-free output ``x·W + s·(x·A)·B`` by (then adds the bias).

    Example:
        >>> import jax.numpy as jnp
        >>> w, a, b = jnp.full((4, 3), 2.0), jnp.ones((4, 1)), jnp.zeros((1, 3))
        >>> magnitude_factor(w, a, b, jnp.full(3, 8.0), 1.0)
        Array([2., 2., 2.], dtype=float32)
    """
    _check_dora(w, a, b, m, scale, n_stack)
    v = w.astype(jnp.float32) + scale * delta(a, b, n_stack)
    n_out = b.ndim - 1 - n_stack
    norm = jax.lax.stop_gradient(column_norm(v, n_stack, n_out))
    return m.astype(jnp.float32) / norm.reshape(m.shape)


def dora_kernel(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, scale: float, n_stack: int = 0
) -> jax.Array:
    """The DoRA kernel ``m · V / sg(‖V‖_c)`` with ``V = W + s·A·B``, in W's dtype.

    Computed as ``V · (m / ‖V‖_c)``: when ``m`` equals the column norm bit for bit (a fresh
    adapter) the factor is exactly 1 and the result is exactly ``W``.

    Example:
        >>> import jax.numpy as jnp
        >>> w, a, b = jnp.full((4, 3), 2.0), jnp.ones((4, 1)), jnp.zeros((1, 3))
        >>> bool((dora_kernel(w, a, b, jnp.full(3, 4.0), 1.0) == w).all())
        True
    """
    _check_dora(w, a, b, m, scale, n_stack)
    v = w.astype(jnp.float32) + scale * delta(a, b, n_stack)
    n_out = b.ndim - 1 - n_stack
    norm = jax.lax.stop_gradient(column_norm(v, n_stack, n_out))
    factor = m.astype(jnp.float32).reshape(norm.shape) / norm
    return (v * factor).astype(w.dtype)


def _to_output(value: jax.Array, y: jax.Array) -> jax.Array:
    """``value``, shaped like the output axes, with leading axes added to broadcast with ``y``."""
    return value.reshape((1,) * (y.ndim - value.ndim) + value.shape).astype(y.dtype)


def _float(weight):
    return dequantize(weight) if is_quantized(weight) else weight


class Dora(Variant):
    """DoRA: a magnitude per output column (``lora_magnitude``), ``m · V / ‖V‖_c``.

    Example:
        >>> import jax.numpy as jnp
        >>> w, a, b = jnp.full((4, 3), 2.0), jnp.ones((4, 1)), jnp.zeros((1, 3))
        >>> DORA.merge(w, a, b, {"lora_magnitude": jnp.full(3, 8.0)}, 1.0, 0, "m")[0]
        Array([4., 4., 4.], dtype=float32)
    """

    name = "dora"
    extra_leaves = (LORA_MAGNITUDE,)
    fusable = False

    def check(self, leaf, where):
        if leaf == EMBEDDING:
            raise ValueError(
                f"DoRA adapts dense and conv kernels; `{where}` is an embedding table: leave it "
                "out of `target_modules` or train it with plain LoRA"
            )

    def init(self, target, weight, config):
        self.check(EMBEDDING if target.kind == "embed" else target.leaf, target.path)
        norm = column_norm(_float(weight), target.n_stack, target.n_out)
        shape = target.shape[: target.n_stack] + target.b_shape[target.n_stack + 1 :]
        return {LORA_MAGNITUDE: norm.reshape(shape).astype(jnp.dtype(config.dtype))}

    def merge(self, weight, a, b, extras, scale, n_stack, where):
        m = extras[LORA_MAGNITUDE]
        expected = tuple(weight.shape[:n_stack]) + tuple(weight.shape[a.ndim - 1 :])
        if tuple(m.shape) != expected:
            raise ValueError(
                f"`{LORA_MAGNITUDE}` at `{where}` has shape {tuple(m.shape)}; the kernel "
                f"{tuple(weight.shape)} needs stack + output = {expected}"
            )
        return dora_kernel(weight, a, b, m, scale, n_stack)

    def unmerge(self, merged, a, b, extras, scale, n_stack, where):
        raise ValueError(
            f"`lora` at `{where}` is a DoRA module, and a DoRA merge cannot be undone from the "
            "merged kernel: the column norms of W + s·A·B are lost (any norms give a valid W). "
            "Keep the base params and merge the adapter into them again instead of unmerging"
        )

    def factored(self, y, term, weight, bias, a, b, extras, scale):
        w = _float(weight)
        n_stack = a.ndim + b.ndim - 2 - w.ndim
        factor = magnitude_factor(w, a, b, extras[LORA_MAGNITUDE], scale, n_stack)
        if bias is not None:
            y = y - _to_output(bias, y)
        out = (y + term.astype(y.dtype)) * _to_output(factor, y)
        return out if bias is None else out + _to_output(bias, y)

    def file_entries(self, target):
        self.check(EMBEDDING if target.kind == "embed" else target.leaf, target.path)
        output = target.b_shape[target.n_stack + 1 :]
        size = math.prod(output)
        windows = target.layout.count("w")
        peft_shape = (1, size) + (1,) * windows if target.kind == "conv" else (size,)
        return (FileEntry("." + PEFT_MAGNITUDE, LORA_MAGNITUDE, output, peft_shape),)


#: The DoRA variant.
DORA = Dora()
