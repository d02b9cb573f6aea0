"""The factored LoRA forward for NNX: adapted layers of a merged module are wrapped for one call.

:func:`jaxlora.apply` rebuilds the module from its ``GraphDef`` and the frozen state
(``nnx.merge``), then :func:`attach` puts a :class:`FactoredLayer` in place of each adapted
``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed``. The wrapper holds the
factors as variables, so a model that runs a stacked layer under ``nnx.scan`` / ``nnx.vmap`` slices
them with the kernel; a stacked layer also gets one dropout key per slice. The wrapper calls the
original layer and adds ``s·((dropout(x)·A)·B)`` computed by :mod:`jaxlora.lowrank`, in the
adapter's dtype, cast to the layer's output dtype (a DoRA module then rescales each output column
by its magnitude factor, as on the linen path). The module is thrown away after the call, so the
user's ``GraphDef`` and state are never changed.

A layer is adapted where it is *called* (``__call__``, ``Embed.attend``); code that reads a kernel
directly (``layer.kernel[...]``) sees W alone, so such models need ``mode="merged"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora._src import paths
from jaxlora._src.axes import normalize_axes
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import lowrank
from jaxlora._src.types import LORA_A, LORA_B, LoraTree
from jaxlora._src.variants import base as variants

_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)


class LoraFactor(nnx.Variable):
    """A LoRA factor (or dropout key) attached to a layer for the duration of one call."""


def _term(base: nnx.Module, method: str, x, args, kwargs, a, b, scale: float, where: str, drop):
    """``s·(drop(x)·A)·B`` for one call of ``base``, in the adapter's dtype."""
    precision = getattr(base, "precision", None)
    if isinstance(base, nnx.Embed):
        if method == "attend":
            return lowrank.attend(x.astype(a.dtype), a, b, scale, precision)
        return lowrank.embed(x, a, b, scale, precision)
    kernel_shape = tuple(base.kernel.shape)
    x = drop(jnp.asarray(x).astype(a.dtype))
    if isinstance(base, nnx.Linear):
        lowrank.check_factors(where, "io", kernel_shape, a, b)
        return lowrank.dot(x, a, b, scale, (x.ndim - 1,), (), precision)
    if isinstance(base, nnx.LinearGeneral):
        axis = normalize_axes(tuple(base.axis), x.ndim)
        batch = normalize_axes(tuple(base.batch_axis.keys()), x.ndim)
        layout = "s" * len(batch) + "i" * len(axis) + "o" * len(base.out_features)
        lowrank.check_factors(where, layout, kernel_shape, a, b)
        return lowrank.dot(x, a, b, scale, axis, batch, precision)
    if isinstance(base, nnx.Einsum):
        spec = args[0] if args else kwargs.get("einsum_str")
        spec = (spec or base.einsum_str).replace(" ", "")
        return lowrank.einsum(
            where, spec, kernel_shape, x, a, b, scale, precision, base.preferred_element_type
        )
    lowrank.check_plain_conv(where, base.feature_group_count, base.mask)
    lowrank.check_factors(where, "w" * (len(kernel_shape) - 2) + "io", kernel_shape, a, b)
    # Linen's Conv with A as its kernel: the layer's own padding, strides and dilation.
    down = nn.Conv(
        features=a.shape[-1],
        kernel_size=base.kernel_size,
        strides=base.strides,
        padding=base.padding,
        input_dilation=base.input_dilation,
        kernel_dilation=base.kernel_dilation,
        use_bias=False,
        precision=precision,
        dtype=a.dtype,
    )
    h = down.apply({"params": {"kernel": a}}, x)
    return lowrank.project(h * scale, b, 0, precision)


class FactoredLayer(nnx.Module):
    """An adapted layer: the original ``base`` and ``s·((dropout(x)·A)·B)``, combined by the
    module's variant (plain LoRA: their sum; DoRA: rescaled per output column). The variant's
    extra leaves (``extras``) are held as variables beside the factors."""

    def __init__(self, base: nnx.Module, a, b, scale: float, where: str, rate: float, key,
                 extras: Mapping[str, Any] | None = None, variant: str = "lora"):  # fmt: skip
        self.base = base
        self.lora_a = LoraFactor(a)
        self.lora_b = LoraFactor(b)
        self.dropout_key = LoraFactor(key) if key is not None else None
        self.scale = scale
        self.where = where
        self.rate = rate
        self.variant = variant
        self.extra_names = tuple(extras or ())
        for name, value in (extras or {}).items():
            setattr(self, name, LoraFactor(value))

    def _add(self, method: str, y, x, args, kwargs):
        a, b = self.lora_a[...], self.lora_b[...]
        drop = lambda v: v  # noqa: E731
        if self.dropout_key is not None:
            key = self.dropout_key[...]
            drop = lambda v: lowrank.dropout(v, self.rate, key)  # noqa: E731
        term = _term(self.base, method, x, args, kwargs, a, b, self.scale, self.where, drop)
        extras = {name: getattr(self, name)[...] for name in self.extra_names}
        weight = self.base.embedding if isinstance(self.base, nnx.Embed) else self.base.kernel
        bias = getattr(self.base, "bias", None)
        bias = None if bias is None else bias[...]
        variant = variants.get(self.variant)
        return variant.factored(y, term, weight[...], bias, a, b, extras, self.scale)

    def __call__(self, x, *args, **kwargs):
        return self._add("__call__", self.base(x, *args, **kwargs), x, args, kwargs)

    def attend(self, query, *args, **kwargs):
        return self._add("attend", self.base.attend(query, *args, **kwargs), query, args, kwargs)


def _child(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) or isinstance(node, Mapping) else getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, int) or isinstance(node, Mapping):
        node[key] = value
    else:
        setattr(node, key, value)


def attach(module: nnx.Module, lora: LoraTree, config: LoraConfig, key: jax.Array | None) -> None:
    """Replaces each adapted layer of ``module`` (in place) by a :class:`FactoredLayer`.

    Args:
        module: a module fresh from ``nnx.merge`` (it is modified).
        lora: the adapter Θ.
        config: the config Θ was made with.
        key: a PRNG key turning LoRA dropout on, or None.

    Raises:
        ValueError: when Θ names a module that is not an adaptable NNX layer.
    """
    for keys, names, _ in paths.flatten(lora):
        if names[-1] != LORA_A:
            continue
        where = paths.join(names[:-1])
        parent = module
        for k in keys[:-2]:
            parent = _child(parent, k)
        base = _child(parent, keys[-2])
        if not isinstance(base, _LAYERS):
            raise ValueError(
                f"`lora` adapts `{where}`, but that is a {type(base).__name__}; the factored path "
                "adapts nnx.Linear, LinearGeneral, Einsum, Conv and Embed; use `mode='merged'`"
            )
        module_lora = paths.get_in(lora, keys[:-1])
        a, b = module_lora[LORA_A], module_lora.get(LORA_B)
        if b is None:
            raise ValueError(f"`lora` has `{LORA_A}` but no `{LORA_B}` at `{where}`")
        variant = variants.variant_of(module_lora, where)
        variant.check("embedding" if isinstance(base, nnx.Embed) else "kernel", where)
        extras = {name: module_lora[name] for name in variant.extra_leaves}
        weight = base.embedding if isinstance(base, nnx.Embed) else base.kernel
        n_stack = a.ndim + b.ndim - 2 - weight.ndim
        layer_key = None
        if key is not None:
            layer_key = jax.random.fold_in(key, zlib.crc32(where.encode()) & 0x7FFFFFFF)
            if n_stack > 0:
                layer_key = jax.random.split(layer_key, a.shape[:n_stack])
        scale = config.scale_for(where, int(a.shape[-1]))
        wrapped = FactoredLayer(
            base, a, b, scale, where, config.lora_dropout, layer_key, extras, variant.name
        )
        _set_child(parent, keys[-2], wrapped)
