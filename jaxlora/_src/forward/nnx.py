"""The factored LoRA forward for NNX: adapted weights as :class:`AdaptedParam`, known layers hooked.

:func:`jaxlora.apply` rebuilds the module from its ``GraphDef`` and a state in which each adapted
weight is an :class:`~jaxlora._src.forward.adapted.AdaptedParam` (:func:`adapt_state`): an
``nnx.Param`` holding W and its factors, so the factors travel with the kernel through a model's
own ``nnx.scan`` / ``nnx.vmap``. Nothing else of the module changes: ``layer.kernel.shape``,
``layer.in_features`` and every other attribute read as they always do.

During the call (:func:`hooked_layers`) the methods of ``nnx.Linear``, ``LinearGeneral``,
``Einsum``, ``Conv`` and ``Embed`` (``__call__``, ``attend``) are hooked, on the class itself, so
a subclass that post-processes its parent's output (``super().__call__(x) * c``) is adapted
inside, before its own scaling. A hooked call whose weight is adapted reads W and adds
``s·((dropout(x)·A)·B)`` (:mod:`jaxlora.lowrank`) in the adapter's dtype, cast to the layer's
output dtype; a DoRA module then rescales each output column. A ``Linear``, a ``LinearGeneral``
contracting its input's trailing axes or an ``Einsum`` whose equation is such a dense layer runs
layer and term as one :func:`fused.dense` (the fast path, LoRA dropout included), as linen's
``Dense`` does. NNX has no method interception of
its own, hence the hook; it passes every call with a plain weight straight through, and is removed
when the last concurrent :func:`jaxlora.apply` ends. Every other read of an adapted weight
(``layer.kernel[...]`` in the user's code, a recurrent cell, ``ConvTranspose``) gets
``W + s·A·B``, exactly what :func:`jaxlora.merge` gives.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import zlib
from collections.abc import Iterator
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxlora._src.axes import normalize_axes
from jaxlora._src.config import axes_order
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import fused, lowrank
from jaxlora._src.forward.adapted import (
    AdaptedParam,
    AdaptedWeight,
    adapted_params,
    call_input,
    consuming,
)
from jaxlora._src.types import LoraTree, Params
from jaxlora._src.variants import base as variants


def _term(kind: str, layer: nnx.Module, x, einsum_str, w: AdaptedWeight, scale, drop):
    """``s·(drop(x)·A)·B`` for one call of ``layer`` (an instance of the class ``kind`` names),
    in the adapter's dtype."""
    a, b, where = w.a, w.b, w.where
    precision = getattr(layer, "precision", None)
    if kind == "attend":
        return lowrank.attend(jnp.asarray(x).astype(a.dtype), a, b, scale, precision)
    if kind == "embed":
        return lowrank.embed(x, a, b, scale, precision)
    x = drop(jnp.asarray(x).astype(a.dtype))
    if kind == "linear":
        lowrank.check_factors(where, "io", w.shape, a, b)
        return lowrank.dot(x, a, b, scale, (x.ndim - 1,), (), precision)
    if kind == "linear_general":
        general = cast(nnx.LinearGeneral, layer)
        axis = normalize_axes(tuple(general.axis), x.ndim)
        batch = normalize_axes(tuple(general.batch_axis.keys()), x.ndim)
        layout = "s" * len(batch) + "i" * len(axis) + "o" * len(general.out_features)
        lowrank.check_factors(where, layout, w.shape, a, b)
        return lowrank.dot(x, a, b, scale, axis, batch, precision)
    if kind == "einsum":
        einsum = cast(nnx.Einsum, layer)
        spec = (einsum_str or einsum.einsum_str).replace(" ", "")
        return lowrank.einsum(
            where, spec, w.shape, x, a, b, scale, precision, einsum.preferred_element_type
        )
    lowrank.check_factors(where, "w" * (w.ndim - 2) + "io", w.shape, a, b)
    # Linen's Conv with A as its kernel: the layer's own padding, strides and dilation.
    conv = cast(nnx.Conv, layer)
    down = nn.Conv(
        features=a.shape[-1],
        kernel_size=conv.kernel_size,
        strides=conv.strides,
        padding=conv.padding,
        input_dilation=conv.input_dilation,
        kernel_dilation=conv.kernel_dilation,
        use_bias=False,
        precision=precision,
        dtype=a.dtype,
    )
    h = down.apply({"params": {"kernel": a}}, x)
    return lowrank.project(h * scale, b, 0, precision)


def _factorable(kind: str, layer: nnx.Module) -> bool:
    """Whether the call's output is linear in the weight the way the term assumes (a custom
    ``dot_general`` / ``einsum_op`` / conv op, groups or a mask run on the merged weight)."""
    if kind == "linear":
        return cast(nnx.Linear, layer).dot_general is lax.dot_general
    if kind == "linear_general":
        general = cast(nnx.LinearGeneral, layer)
        return general.dot_general_cls is None and general.dot_general in (None, lax.dot_general)
    if kind == "einsum":
        return cast(nnx.Einsum, layer).einsum_op is jnp.einsum
    if kind == "conv":
        conv = cast(nnx.Conv, layer)
        plain_op = conv.conv_general_dilated is lax.conv_general_dilated
        return plain_op and conv.feature_group_count == 1 and conv.mask is None
    return True


def _fused(kind, layer, x, einsum_str, w: AdaptedWeight, keep, rate, kwargs) -> jax.Array | None:
    """A ``Linear`` / ``LinearGeneral`` / ``Einsum`` call and its low-rank term as one
    :func:`fused.dense`, or None where the fast path does not apply (see :func:`fused.layer_call`;
    a ``LinearGeneral`` qualifies when it contracts the trailing axes of its input in order,
    without batch axes, an ``Einsum`` when its equation is such a dense layer; an ``out_sharding``
    or ``preferred_element_type`` keeps the layer's own call)."""
    if kind not in ("linear", "linear_general", "einsum") or not w.canonical:
        return None
    if kwargs.get("out_sharding") is not None or layer.preferred_element_type is not None:
        return None
    x = jnp.asarray(x)
    n_in = 1
    if kind == "linear_general":
        axis = normalize_axes(tuple(layer.axis), x.ndim)
        n_in = len(axis)
        if layer.batch_axis or axis != tuple(range(x.ndim - n_in, x.ndim)):
            return None
    if kind == "einsum":
        n_in = axes_order.trailing_contraction(einsum_str or layer.einsum_str, x.ndim)
        if n_in is None:
            return None
    lowrank.check_factors(w.where, "i" * n_in + "o" * (w.ndim - n_in), w.shape, w.a, w.b)
    bias = None if layer.bias is None else layer.bias[...]
    if bias is not None and bias.size != math.prod(w.shape[n_in:]):
        return None  # a misshapen Einsum bias: the layer's own call raises
    promote = lambda *t: layer.promote_dtype(t, dtype=layer.dtype)  # noqa: E731
    return fused.layer_call(
        x, w.base, bias, promote, w.a, w.b, keep, w.scale, rate, layer.precision, n_in
    )


def _hook(kind: str, original):
    leaf = "embedding" if kind in ("embed", "attend") else "kernel"

    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        var = getattr(self, leaf, None)
        if not isinstance(var, AdaptedParam) or not _factorable(kind, self):
            return original(self, *args, **kwargs)
        w = var.adapted
        variant = variants.variant_of(w.factors, w.where)
        if variant.extra_leaves and not w.canonical:
            # A variant that rescales the output reads W in the factors' axis order.
            return original(self, *args, **kwargs)
        x, einsum_str = call_input(kind, args, kwargs)
        rate, keep = w.lora_config.lora_dropout, None
        if w.key is not None and kind not in ("embed", "attend"):
            keep = fused.keep_mask(w.key, rate, jnp.shape(x))
        if variant.fusable:
            y = _fused(kind, self, x, einsum_str, w, keep, rate, kwargs)
            if y is not None:
                return y
        variant.check(leaf, w.where)
        with consuming(w):
            y = original(self, *args, **kwargs)
        drop = lambda v: fused.apply_mask(v, keep, rate)  # noqa: E731
        scale = w.scale
        term = _term(kind, self, x, einsum_str, w, scale, drop)
        bias = getattr(self, "bias", None)
        bias = None if bias is None else bias[...]
        extras = {n: w.factors[n] for n in variant.extra_leaves}
        return variant.factored(y, term, w.base, bias, w.a, w.b, extras, scale)

    return hooked


_METHODS = (
    (nnx.Linear, "__call__", "linear"),
    (nnx.LinearGeneral, "__call__", "linear_general"),
    (nnx.Einsum, "__call__", "einsum"),
    (nnx.Conv, "__call__", "conv"),
    (nnx.Embed, "__call__", "embed"),
    (nnx.Embed, "attend", "attend"),
)
_ORIGINALS = {(cls, name): cls.__dict__[name] for cls, name, _ in _METHODS}
_LOCK = threading.Lock()
_ACTIVE = [0]


@contextlib.contextmanager
def hooked_layers() -> Iterator[None]:
    """Hooks the known NNX layer methods for the duration of the block (re-entrant, thread-safe:
    the hooks stay until the last block open in any thread ends)."""
    with _LOCK:
        if _ACTIVE[0] == 0:
            for cls, name, kind in _METHODS:
                setattr(cls, name, _hook(kind, _ORIGINALS[cls, name]))
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if _ACTIVE[0] == 0:
                for cls, name, _ in _METHODS:
                    setattr(cls, name, _ORIGINALS[cls, name])


def _with_key(w: AdaptedWeight, key: jax.Array) -> AdaptedWeight:
    """``w`` with a LoRA dropout key of its own: one per stacked slice of a stacked weight."""
    layer_key = jax.random.fold_in(key, zlib.crc32(w.where.encode()) & 0x7FFFFFFF)
    n_stack = w.a.ndim + w.b.ndim - 2 - w.ndim
    if n_stack > 0:
        layer_key = jax.random.split(layer_key, w.a.shape[:n_stack])
    return w.replace(key=layer_key)


def adapt_state(frozen: Params, lora: LoraTree, config: LoraConfig, key: jax.Array | None):
    """The state the factored NNX call runs on: Θ's copies in place, each adapted weight an
    :class:`AdaptedParam` (with a dropout key when ``key`` is given).

    Raises:
        ValueError: as :func:`jaxlora.merge` does, when Θ does not fit ``frozen``.
    """
    state = adapted_params(frozen, lora, config)

    def to_param(var):
        value = var.get_raw_value() if isinstance(var, nnx.Variable) else None
        if not isinstance(value, AdaptedWeight):
            return var
        if key is not None and config.lora_dropout > 0:
            value = _with_key(value, key)
        metadata = {k: v for k, v in var.get_metadata().items() if k != "eager_sharding"}
        return AdaptedParam(value, eager_sharding=False, **metadata)

    return jax.tree.map(to_param, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
