"""The factored LoRA forward for linen: ``y = layer(x) + s·((dropout(x)·A)·B)``, never forming ΔW.

An interceptor (:func:`lora_interceptor`, used through ``flax.linen.intercept_methods``) watches
every ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv`` and ``Embed`` call. A layer whose
``params`` hold ``lora_a`` / ``lora_b`` beside its kernel (the tree :func:`jaxlora.combine` builds)
runs unchanged and then adds the low-rank term, contracted over the axes the layer itself
contracts; every other layer runs untouched. Inside ``nn.scan`` the factors are sliced per layer
with the kernel, and the module path equals the params path, so the scale is
``config.scale_for(path, rank)`` everywhere.

A plain ``Dense`` (default ``dot_general``, unquantised kernel, input and factors of one dtype) with
LoRA dropout off takes a fast path: layer and term run as one :func:`lowrank.dense_fused`, whose
backward contracts on 2-D views (see there for why that matters on CPU). Its outputs and gradients
are the general path's, within float rounding.

Numerics, as in PEFT: the low-rank term runs in the adapter's dtype (``LoraConfig.dtype``) with the
layer's ``precision``, and is cast to the layer's output dtype before the add. LoRA dropout draws
from the ``"dropout"`` rng stream (the one a scanned model already splits per layer), acts on the
LoRA input only, and is off when ``deterministic``. Embedding lookups take no dropout (their input
is token ids), as in PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora._src.axes import as_tuple, normalize_axes
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import lowrank
from jaxlora._src.types import LORA_A, LORA_B
from jaxlora._src.variants import base as variants

#: The rng stream LoRA dropout draws from.
DROPOUT_RNG = "dropout"

_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


def _dense_general(module: nn.DenseGeneral, x: jax.Array, a, b, scale, where: str) -> jax.Array:
    precision = module.precision
    axis = normalize_axes(as_tuple(module.axis), x.ndim)
    batch = normalize_axes(as_tuple(module.batch_dims), x.ndim)
    layout = "s" * len(batch) + "i" * len(axis) + "o" * len(as_tuple(module.features))
    kernel = module.get_variable("params", "kernel")
    lowrank.check_factors(where, layout, kernel.shape, a, b)
    return lowrank.dot(x, a, b, scale, axis, batch, precision)


def _einsum(module: nn.Einsum, x: jax.Array, a, b, scale, where: str, einsum_str) -> jax.Array:
    spec = (einsum_str or module.einsum_str).replace(" ", "")
    kernel = module.get_variable("params", "kernel")
    return lowrank.einsum(
        where, spec, kernel.shape, x, a, b, scale, module.precision, module.preferred_element_type
    )


def _conv(module: nn.Conv, x: jax.Array, a, b, scale, where: str) -> jax.Array:
    lowrank.check_plain_conv(where, module.feature_group_count, module.mask)
    kernel = module.get_variable("params", "kernel")
    layout = "w" * (kernel.ndim - 2) + "io"
    lowrank.check_factors(where, layout, kernel.shape, a, b)
    # The layer's own padding, strides and dilation, with A as a kernel of `r` output channels.
    precision = module.precision
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype)
    h = down.apply({"params": {"kernel": a}}, x)
    return lowrank.project(h * scale, b, 0, precision)


def _fused_dense(module, args, kwargs, a, b, scale, where: str) -> jax.Array | None:
    """A plain ``Dense`` call and its low-rank term as one :func:`lowrank.dense_fused`, or None.

    Only for a ``Dense`` with the default ``dot_general``, a plain (not quantised) kernel, and
    input, kernel and factors of one dtype after the layer's own promotion, so the result is what
    the layer plus the separate low-rank term compute. Every other layer takes the general path.
    """
    if type(module) is not nn.Dense or module.dot_general is not None:
        return None
    if module.dot_general_cls is not None:
        return None
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if not isinstance(kernel, jax.Array) or not (bias is None or isinstance(bias, jax.Array)):
        return None
    x = args[0] if args else kwargs["inputs"]
    stored = kernel
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    if not (x.dtype == kernel.dtype == a.dtype == b.dtype):
        return None
    lowrank.check_factors(where, "io", kernel.shape, a, b)
    if jnp.issubdtype(stored.dtype, jnp.floating) and stored.dtype.itemsize < x.dtype.itemsize:
        kernel = stored  # cast inside, so only the narrow kernel is kept for the backward pass
    return lowrank.dense_fused(x, kernel, bias, a, b, scale, module.precision)


def _low_rank_term(module, method: str, args, kwargs, a, b, scale, where: str, drop) -> jax.Array:
    """The low-rank term ``s·(drop(x)·A)·B`` of one call, in the adapter's dtype."""
    x = args[0] if args else kwargs["inputs"] if "inputs" in kwargs else kwargs["query"]
    precision = getattr(module, "precision", None)
    if isinstance(module, nn.Embed):
        if method == "attend":
            return lowrank.attend(x.astype(a.dtype), a, b, scale, precision)
        return lowrank.embed(x, a, b, scale, precision)
    x = drop(jnp.asarray(x).astype(a.dtype))
    if isinstance(module, nn.Dense):
        kernel = module.get_variable("params", "kernel")
        lowrank.check_factors(where, "io", kernel.shape, a, b)
        return lowrank.dot(x, a, b, scale, (x.ndim - 1,), (), precision)
    if isinstance(module, nn.DenseGeneral):
        return _dense_general(module, x, a, b, scale, where)
    if isinstance(module, nn.Einsum):
        einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        return _einsum(module, x, a, b, scale, where, einsum_str)
    return _conv(module, x, a, b, scale, where)


def lora_interceptor(config: LoraConfig, deterministic: bool = True) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs adapted layers factored.

    Args:
        config: the config the adapter was made with (it gives each module's scale).
        deterministic: when False and ``config.lora_dropout > 0``, LoRA dropout is applied, drawing
            from the ``"dropout"`` rng stream of the surrounding ``apply``.

    Returns:
        The interceptor. Use it around an ``apply`` of the combined tree; :func:`jaxlora.apply`
        does this for you.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
        >>> model = nn.Dense(3)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
        >>> config = jaxlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(1))
        >>> with nn.intercept_methods(lora_interceptor(config)):
        ...     y = model.apply({"params": jaxlora.combine(frozen, lora)}, jnp.ones((1, 4)))
        >>> merged = model.apply({"params": jaxlora.merge(frozen, lora, config)}, jnp.ones((1, 4)))
        >>> bool(jnp.allclose(y, merged, atol=1e-5))
        True
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")
    use_dropout = config.lora_dropout > 0 and not deterministic

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        method = context.method_name
        if (
            not isinstance(module, _LAYERS)
            or method not in ("__call__", "attend")
            or (method == "attend" and not isinstance(module, nn.Embed))
            or not module.has_variable("params", LORA_A)
        ):
            return next_fun(*args, **kwargs)
        where = "/".join(module.path)
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        if b is None:
            raise ValueError(f"the params at `{where}` hold `{LORA_A}` but no `{LORA_B}`")
        drop = lambda x: x  # noqa: E731
        if use_dropout:
            if not module.has_rng(DROPOUT_RNG):
                raise ValueError(
                    f"LoRA dropout ({config.lora_dropout}) is on but the apply at `{where}` has no "
                    f"`{DROPOUT_RNG}` rng; pass `rngs={{'{DROPOUT_RNG}': key}}` or run "
                    "deterministic"
                )
            key = module.make_rng(DROPOUT_RNG)
            drop = lambda x: lowrank.dropout(x, config.lora_dropout, key)  # noqa: E731
        scale = config.scale_for(where, int(a.shape[-1]))
        own = {n: module.get_variable("params", n) for n in variants.adapter_leaves()
               if module.has_variable("params", n)}  # fmt: skip
        variant = variants.variant_of(own, where)
        if variant.fusable and not use_dropout and method == "__call__":
            fused = _fused_dense(module, args, kwargs, a, b, scale, where)
            if fused is not None:
                return fused
        extras = {n: own[n] for n in variant.extra_leaves}
        call = (next_fun, method, args, kwargs)
        return _variant_call(variant, module, call, a, b, extras, scale, where, drop)

    return intercept


def _variant_call(variant, module, call, a, b, extras, scale, where: str, drop) -> jax.Array:
    """One adapted call, ``call = (next_fun, method, args, kwargs)``: the layer's own output and
    its low-rank term, combined by the module's variant (plain LoRA: their sum)."""
    next_fun, method, args, kwargs = call
    leaf = "embedding" if isinstance(module, nn.Embed) else "kernel"
    variant.check(leaf, where)
    y = next_fun(*args, **kwargs)
    term = _low_rank_term(module, method, args, kwargs, a, b, scale, where, drop)
    weight = module.get_variable("params", leaf)
    bias = module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None
    return variant.factored(y, term, weight, bias, a, b, extras, scale)
