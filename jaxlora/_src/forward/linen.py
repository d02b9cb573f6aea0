"""The factored LoRA forward for linen: ``y = layer(x) + s·((dropout(x)·A)·B)``, never forming ΔW.

:func:`jaxlora.apply` hands the model a params tree in which each adapted weight is an
:class:`~jaxlora._src.forward.adapted.AdaptedWeight` (W with its factors). An interceptor
(:func:`lora_interceptor`, used through ``flax.linen.intercept_methods``) watches the calls of the
layer methods whose maths it knows: ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv`` and
``Embed`` (``__call__`` and ``attend``), recognised by the method itself, so a subclass that
post-processes the layer's output (``super().__call__(x) * c``) is adapted inside, before its own
scaling. Such a call reads W and gets the low-rank term added, contracted over the axes the layer
itself contracts. Every other read of an adapted weight (a recurrent cell, ``ConvTranspose``,
``ConvLocal``, a module doing ``x @ self.param("kernel", ...)``, a grouped or masked ``Conv``, a
``Dense`` with a custom ``dot_general``) gets ``W + s·A·B`` folded inside the forward pass: the
same result as ``mode="merged"``, at merged speed for that layer. Inside ``nn.scan`` the factors
are sliced per layer with the kernel.

A ``Dense``, a ``DenseGeneral`` contracting its input's trailing axes, or an ``Einsum`` whose
equation is such a dense layer (``btnh,nhd->btd``; default ``dot_general``, unquantised kernel)
takes the fast path, LoRA dropout included: layer and term run as one
:func:`fused.dense`, whose backward contracts on 2-D views (see there for why that matters on
CPU). Its outputs and gradients are the general path's, within float rounding.

Numerics, as in PEFT: the low-rank term runs in the adapter's dtype (``LoraConfig.dtype``) with the
layer's ``precision``, and is cast to the layer's output dtype before the add. LoRA dropout draws
from the ``"dropout"`` rng stream (the one a scanned model already splits per layer), acts on the
LoRA input only, and is off when ``deterministic``. Embedding lookups take no dropout (their input
is token ids), as in PEFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora._src import validate
from jaxlora._src.axes import as_tuple, normalize_axes
from jaxlora._src.config import axes_order
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import fused, lowrank
from jaxlora._src.forward.adapted import AdaptedWeight, call_input, consuming
from jaxlora._src.types import LORA_A
from jaxlora._src.variants import base as variants

#: The rng stream LoRA dropout draws from.
DROPOUT_RNG = "dropout"


def _own(method: Any) -> Any:
    """The function a linen class defines for ``method`` (linen wraps it once)."""
    return getattr(method, "__wrapped__", method)


#: The layer methods whose output the factored path knows how to extend, by the function itself.
_KNOWN = {
    _own(nn.Dense.__call__): "dense",
    _own(nn.DenseGeneral.__call__): "dense_general",
    _own(nn.Einsum.__call__): "einsum",
    _own(nn.Conv.__call__): "conv",
    _own(nn.Embed.__call__): "embed",
    _own(nn.Embed.attend): "attend",
}


def _kind(context: Any) -> str | None:
    """What known layer method this call is, or None (the call then runs as it is)."""
    kind = _KNOWN.get(getattr(context.orig_method, "func", None))
    if kind == "conv" and not isinstance(context.module, nn.Conv):
        return None  # ConvLocal shares the method but not the maths
    return kind


def _dense_general(module: nn.DenseGeneral, x: jax.Array, w: AdaptedWeight, scale) -> jax.Array:
    axis = normalize_axes(as_tuple(module.axis), x.ndim)
    batch = normalize_axes(as_tuple(module.batch_dims), x.ndim)
    layout = "s" * len(batch) + "i" * len(axis) + "o" * len(as_tuple(module.features))
    lowrank.check_factors(w.where, layout, w.shape, w.a, w.b)
    return lowrank.dot(x, w.a, w.b, scale, axis, batch, module.precision)


def _conv(module: nn.Conv, x: jax.Array, w: AdaptedWeight, scale) -> jax.Array:
    lowrank.check_factors(w.where, "w" * (w.ndim - 2) + "io", w.shape, w.a, w.b)
    # The layer's own padding, strides and dilation, with A as a kernel of `r` output channels.
    a = w.a
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype)
    h = down.apply({"params": {"kernel": a}}, x)
    return lowrank.project(h * scale, w.b, 0, module.precision)


def _fused(kind, module, x, einsum_str, w: AdaptedWeight, keep, rate: float) -> jax.Array | None:
    """A ``Dense`` / ``DenseGeneral`` / ``Einsum`` call and its low-rank term as one
    :func:`fused.dense`, or None where the fast path does not apply (see :func:`fused.layer_call`;
    a ``DenseGeneral`` qualifies when it contracts the trailing axes of its input in order, without
    batch axes, an ``Einsum`` when its equation is such a dense layer, e.g. ``btnh,nhd->btd``)."""
    if kind not in ("dense", "dense_general", "einsum") or not w.canonical:
        return None
    x = jnp.asarray(x)
    n_in = 1
    if kind == "dense_general":
        axis = normalize_axes(as_tuple(module.axis), x.ndim)
        n_in = len(axis)
        if as_tuple(module.batch_dims) or axis != tuple(range(x.ndim - n_in, x.ndim)):
            return None
    if kind == "einsum":
        if einsum_str is not None and module.einsum_str is not None:
            return None  # the layer itself raises: the equation is given twice
        spec = einsum_str or module.einsum_str
        if spec is None:
            return None  # the layer itself raises: no equation is given
        n_in = axes_order.trailing_contraction(spec, x.ndim)
        if n_in is None or module.preferred_element_type is not None:
            return None
    lowrank.check_factors(w.where, "i" * n_in + "o" * (w.ndim - n_in), w.shape, w.a, w.b)
    bias = nn.meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None
    promote = lambda *t: module.promote_dtype(*t, dtype=module.dtype)  # noqa: E731
    return fused.layer_call(
        x, w.base, bias, promote, w.a, w.b, keep, w.scale, rate, module.precision, n_in
    )


def _term(kind: str, module, x, einsum_str, w: AdaptedWeight, scale, drop) -> jax.Array:
    """The low-rank term ``s·(drop(x)·A)·B`` of one call, in the adapter's dtype."""
    a, b = w.a, w.b
    precision = getattr(module, "precision", None)
    if kind == "attend":
        return lowrank.attend(jnp.asarray(x).astype(a.dtype), a, b, scale, precision)
    if kind == "embed":
        return lowrank.embed(x, a, b, scale, precision)
    x = drop(jnp.asarray(x).astype(a.dtype))
    if kind == "dense":
        lowrank.check_factors(w.where, "io", w.shape, a, b)
        return lowrank.dot(x, a, b, scale, (x.ndim - 1,), (), precision)
    if kind == "dense_general":
        return _dense_general(module, x, w, scale)
    if kind == "einsum":
        spec = (einsum_str or module.einsum_str).replace(" ", "")
        return lowrank.einsum(
            w.where, spec, w.shape, x, a, b, scale, precision, module.preferred_element_type
        )
    return _conv(module, x, w, scale)


def _factorable(kind: str, module: nn.Module) -> bool:
    """Whether this call's output is linear in the weight the way the term assumes. A ``Dense``
    with its own ``dot_general`` (e.g. a quantising one) or a grouped / masked ``Conv`` is not
    known to be: it runs on the merged weight instead."""
    if kind in ("dense", "dense_general", "einsum"):
        custom = (getattr(module, n, None) for n in ("dot_general", "dot_general_cls"))
        return all(op is None for op in custom)
    if kind == "conv":
        return module.feature_group_count == 1 and module.mask is None
    if kind in ("embed", "attend"):
        # An overridden setup may derive the table from the param; reuse W only if it is Embed's.
        return type(module).setup is nn.Embed.setup
    return False


@contextlib.contextmanager
def _bare_table(module: nn.Embed, w: AdaptedWeight) -> Iterator[None]:
    """``Embed`` reads its table in ``setup`` (which saw the merged table); for the call itself
    it sees W, and the merged table is put back for anyone reading ``module.embedding`` later."""
    merged = module.embedding
    object.__setattr__(module, "embedding", w.base)
    try:
        yield
    finally:
        object.__setattr__(module, "embedding", merged)


def lora_interceptor(config: LoraConfig, deterministic: bool = True) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs adapted layers factored.

    It acts on params whose adapted weights are
    :class:`~jaxlora._src.forward.adapted.AdaptedWeight` s, as :func:`jaxlora.apply` builds them.

    Args:
        config: the config the adapter was made with (it gives each module's scale).
        deterministic: when False and ``config.lora_dropout > 0``, LoRA dropout is applied, drawing
            from the ``"dropout"`` rng stream of the surrounding ``apply``.

    Returns:
        The interceptor. :func:`jaxlora.apply` uses it for you.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")
    validate.boolean("deterministic", deterministic)
    use_dropout = config.lora_dropout > 0 and not deterministic

    def intercept(next_fun, args, kwargs, context):
        kind = _kind(context)
        module = context.module
        leaf = "embedding" if kind in ("embed", "attend") else "kernel"
        w = module.get_variable("params", leaf) if kind is not None else None
        if kind is not None and module.has_variable("params", LORA_A):
            raise ValueError(
                f"the params of `{'/'.join(module.path)}` hold raw LoRA factors beside the "
                "kernel (a `jaxlora.combine` tree); the interceptor runs on "
                "`jaxlora.adapted_params(frozen, lora, config)`, or use `jaxlora.apply`"
            )
        if kind is None or not isinstance(w, AdaptedWeight) or not _factorable(kind, module):
            return next_fun(*args, **kwargs)  # unknown: any read of its weight gets it merged
        variant = variants.variant_of(w.factors, w.where)
        if variant.extra_leaves and not w.canonical:
            # A variant that rescales the output reads W in the factors' axis order.
            return next_fun(*args, **kwargs)
        x, einsum_str = call_input(kind, args, kwargs)
        keep, rate = None, config.lora_dropout
        if use_dropout and kind not in ("embed", "attend"):
            keep = fused.keep_mask(_dropout_key(module, config), rate, jnp.shape(x))
        drop = lambda v: fused.apply_mask(v, keep, rate)  # noqa: E731
        if variant.fusable:
            y = _fused(kind, module, x, einsum_str, w, keep, rate)
            if y is not None:
                return y
        variant.check(leaf, w.where)
        with (
            consuming(w),
            _bare_table(module, w) if leaf == "embedding" else contextlib.nullcontext(),
        ):
            y = next_fun(*args, **kwargs)
        scale = w.scale
        term = _term(kind, module, x, einsum_str, w, scale, drop)
        bias = module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None
        extras = {n: w.factors[n] for n in variant.extra_leaves}
        return variant.factored(y, term, w.base, bias, w.a, w.b, extras, scale)

    return intercept


def _dropout_key(module: nn.Module, config: LoraConfig) -> jax.Array:
    where = "/".join(module.path)
    if not module.has_rng(DROPOUT_RNG):
        raise ValueError(
            f"LoRA dropout ({config.lora_dropout}) is on but the apply at `{where}` has no "
            f"`{DROPOUT_RNG}` rng; pass `rngs={{'{DROPOUT_RNG}': key}}` or run deterministic"
        )
    return module.make_rng(DROPOUT_RNG)
