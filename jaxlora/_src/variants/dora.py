"""DoRA (Liu et al., 2024): weight-decomposed LoRA.

DoRA trains a magnitude ``m`` per output column beside the LoRA factors and normalises the
direction: ``W' = m · V / ‖V‖_c`` with ``V = W + s·A·B`` and ``‖V‖_c`` the norm of each output
column over the input (and window) axes. As the DoRA paper recommends (section 4.3), the norm is
treated as a constant in the backward pass (``jax.lax.stop_gradient``), which is also what PEFT
does. ``m`` lives in Θ as ``lora_magnitude`` beside ``lora_a`` / ``lora_b``, with the shape
``stack + output`` (PEFT names it ``lora_magnitude_vector``; for a Dense kernel both are
``(out_features,)``), and starts at ``‖W‖_c``, so a fresh DoRA adapter changes nothing.

:func:`dora_merge` folds it into the kernel; ``jaxlora.apply`` runs it either way: merged, or
factored (linen), where each layer multiplies its bias-free output by :func:`magnitude_factor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import find_targets
from jaxlora._src.tree import core
from jaxlora._src.types import LORA_A, LORA_B, LORA_MAGNITUDE, LoraTree, Params, PRNGKey

#: Leaf name of DoRA's magnitude vector in Θ.
#: PEFT's name for the same tensor (``<module>.lora_magnitude_vector`` in adapter files).
PEFT_MAGNITUDE = "lora_magnitude_vector"


def column_norm(v: jax.Array, n_stack: int, n_out: int) -> jax.Array:
    """The float32 norm of each output column: over every axis but the stack and output axes,
    kept as size-1 axes so that it broadcasts against ``v``."""
    axes = tuple(range(n_stack, v.ndim - n_out))
    v32 = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v32 * v32, axis=axes, keepdims=True))


def magnitude_factor(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, scale: float, n_stack: int = 0
) -> jax.Array:
    """``m / sg(‖W + s·A·B‖_c)``, shaped ``stack + output``: the factor a factored DoRA layer
    multiplies its bias-free output ``x·W + s·(x·A)·B`` by (then adds the bias)."""
    v = w.astype(jnp.float32) + scale * core.delta(a, b, n_stack)
    n_out = b.ndim - 1 - n_stack
    norm = jax.lax.stop_gradient(column_norm(v, n_stack, n_out))
    return m.astype(jnp.float32) / norm.reshape(m.shape)


def dora_kernel(
    w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array, scale: float, n_stack: int = 0
) -> jax.Array:
    """The DoRA kernel ``m · V / sg(‖V‖_c)`` with ``V = W + s·A·B``, in W's dtype.

    Computed as ``V · (m / ‖V‖_c)``: when ``m`` equals the column norm bit for bit (a fresh
    adapter) the factor is exactly 1 and the result is exactly ``W``.
    """
    v = w.astype(jnp.float32) + scale * core.delta(a, b, n_stack)
    n_out = b.ndim - 1 - n_stack
    norm = jax.lax.stop_gradient(column_norm(v, n_stack, n_out))
    factor = m.astype(jnp.float32).reshape(norm.shape) / norm
    return (v * factor).astype(w.dtype)


def dora_split(params: Params, config: LoraConfig, key: PRNGKey) -> tuple[Params, LoraTree]:
    """:func:`jaxlora.split` plus a DoRA magnitude ``‖W‖_c`` (in ``config.dtype``) per target.

    Raises:
        ValueError: when a target is an embedding table (DoRA here covers dense and conv kernels).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"q": {"kernel": jnp.full((4, 3), 2.0)}}
        >>> frozen, lora = dora_split(params, jaxlora.LoraConfig(r=2, target_modules=["q"]),
        ...                           jax.random.key(0))
        >>> lora["q"]["lora_magnitude"]
        Array([4., 4., 4.], dtype=float32)
    """
    frozen, lora = core.split(params, config, key)
    dtype = jnp.dtype(config.dtype)
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(params)}
    for target in find_targets(params, config):
        if target.kind == "embed":
            raise ValueError(
                f"DoRA adapts dense and conv kernels; `{target.path}` is an embedding table: "
                "leave it out of `target_modules` or train it with plain LoRA"
            )
        w = leaves[target.keys + (target.leaf,)]
        norm = column_norm(w, target.n_stack, target.n_out)
        magnitude = norm.reshape(
            target.shape[: target.n_stack] + target.b_shape[target.n_stack + 1 :]
        )
        paths.set_in(lora, target.keys + (LORA_MAGNITUDE,), magnitude.astype(dtype))
    return frozen, lora


def _separate(lora: LoraTree, prefix: tuple[Any, ...] = ()) -> tuple[LoraTree, dict]:
    """Θ without DoRA modules' factors, and ``{module keys: (a, b, m)}`` for those modules."""
    plain: LoraTree = {}
    found: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
    if LORA_MAGNITUDE in lora:
        where = paths.join(map(str, prefix))
        if LORA_A not in lora or LORA_B not in lora:
            raise ValueError(
                f"`lora` has `{LORA_MAGNITUDE}` but no `{LORA_A}`/`{LORA_B}` at `{where}`"
            )
        found[prefix] = (lora[LORA_A], lora[LORA_B], lora[LORA_MAGNITUDE])
    for key, value in lora.items():
        if prefix in found and key in (LORA_A, LORA_B, LORA_MAGNITUDE):
            continue
        if isinstance(value, Mapping):
            inner, more = _separate(value, prefix + (key,))
            found.update(more)
            if inner:
                plain[key] = inner
        else:
            plain[key] = value
    return plain, found


def dora_merge(frozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """Folds a DoRA adapter into the base: ``m · V / ‖V‖_c`` for modules with a magnitude,
    ``W + s·A·B`` for plain LoRA modules, copies replacing their base leaves.

    Use it inside the loss for training (the norm is stop-gradiented) and for deployment.

    Raises:
        ValueError: when a magnitude does not fit its kernel or has no kernel in ``frozen``.
    """
    plain, dora = _separate(lora)
    merged = core.merge(frozen, plain, config)
    seen = set()

    def fold(keys, names, leaf):
        module = keys[:-1]
        if names[-1] != "kernel" or module not in dora:
            return leaf
        seen.add(module)
        a, b, m = dora[module]
        w = paths.get_in(frozen, keys)
        n_stack = a.ndim + b.ndim - 2 - w.ndim
        expected = tuple(w.shape[:n_stack]) + tuple(w.shape[a.ndim - 1 :])
        if tuple(m.shape) != expected:
            raise ValueError(
                f"`{LORA_MAGNITUDE}` at `{paths.join(names[:-1])}` has shape {tuple(m.shape)}; "
                f"the kernel {tuple(w.shape)} needs stack + output = {expected}"
            )
        return dora_kernel(
            w, a, b, m, config.scale_for(paths.join(names[:-1]), a.shape[-1]), n_stack
        )

    out = paths.map_with_keys(fold, merged)
    missing = [paths.join(map(str, k)) for k in dora if k not in seen]
    if missing:
        raise ValueError(
            f"`lora` has `{LORA_MAGNITUDE}` at {missing} but `frozen` has no kernel there"
        )
    return out
