"""``jaxlora.factored``: the factored LoRA forward of any JAX function of a params pytree.

There is no layer to hook in a plain function, so the guarantee of the Flax path comes from the
function itself: it is traced to a jaxpr with the base params as inputs, and the jaxpr is run
again by :mod:`jaxlora._src.forward.interpret`, each adapted weight entering as a
:class:`~jaxlora._src.forward.lazy_weight.LazyWeight`. Where the weight (possibly transposed,
reshaped, sliced or cast on the way) meets a ``dot_general`` (``@``, ``jnp.dot``, ``einsum``) or a
convolution, the low-rank term is added beside the base contraction; every other use sees the
merged weight. The side of the contraction tells which of W's axes are its input, so a weight
stored (out, in) and used as ``x @ W.T`` runs factored too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlora._src.config import axes_order
from jaxlora._src.config.conventions import with_tree_layouts
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.forward import adapted, interpret, lazy_weight, lora_dropout
from jaxlora._src.forward.adapted import AdaptedWeight
from jaxlora._src.quant.dequantize import dequantize
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import core, count
from jaxlora._src.types import LoraTree, Params
from jaxlora._src.variants import base as variants


def _is_adapted(x: Any) -> bool:
    return isinstance(x, AdaptedWeight)


def _paired(frozen: Params, lora: LoraTree, config: LoraConfig) -> tuple[list[Any], Any]:
    """The leaves of ``frozen`` with each adapted weight paired with its adapter (an
    :class:`AdaptedWeight`) and each trainable copy of Θ in place of its base leaf, and the
    treedef that rebuilds the params. The one place that knows how Θ's leaves find their weight.
    """
    config = with_tree_layouts(config, count.params_only(frozen))  # Equinox's (out, in) weights
    wrap = adapted.adapted_leaf(config)
    tree = core.map_adapted(frozen, lora, config, wrap, "jaxlora.factored", is_leaf=is_quantized)
    return jax.tree.flatten(tree, is_leaf=lambda x: _is_adapted(x) or is_quantized(x))


def _lazy(weight: AdaptedWeight) -> Any:
    """How an adapted weight enters the function: lazy for plain LoRA, folded for a variant
    whose output is not the plain sum (DoRA)."""
    base = dequantize(weight.base) if is_quantized(weight.base) else weight.base
    if not variants.variant_of(weight.factors, weight.where).fusable:
        return weight.merged()
    layout = axes_order.layout_at(weight.lora_config.layouts, weight.where, weight.names[-1],
                                  tuple(base.shape))  # fmt: skip
    return lazy_weight.from_adapted(base, weight.a, weight.b, layout, weight.scale, weight.where)


def _dequantized(x: Any) -> Any:
    """A quantised kernel as the float weight ``merge`` would give the function."""
    return dequantize(x) if is_quantized(x) else x


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def factored(fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """Transforms ``fn(params, *args)`` into ``g(frozen, lora, *args)``, the function run with
    the adapter ``lora`` on the base ``frozen`` without forming any ``W + s·A·B`` it can avoid.

    Wherever an adapted weight feeds a matmul, ``einsum`` or convolution (directly, or through
    transposes, relabelling reshapes, slices and casts), ``g`` computes ``x·W + s·(x·A)·B``; any
    other use of the weight (a norm of it, an embedding lookup, an op it cannot see through, a
    ``custom_vjp`` function) gets the merged weight ``W + s·A·B``, never the bare W. So ``g``
    equals ``fn(jaxlora.merge(frozen, lora, config), *args)`` in outputs and gradients, within
    float rounding (a quantised base, :mod:`jaxlora.quant`, is dequantised as ``merge`` does).
    It follows the weights into ``jit``, ``lax.scan`` (a stack of layers
    scanned over slices A and B with W), ``fori_loop`` / ``while_loop``, ``cond``,
    ``jax.checkpoint`` and ``shard_map``, and ``g`` itself works under ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``. Which axes of a weight are its input is read from how
    ``fn`` contracts it; a weight stored (out, in) and used as ``x @ W.T`` is factored too.

    Args:
        fn: a function whose first argument is the params pytree ``frozen`` came from.
        config: the config ``lora`` was made with (its scale and layouts).

    Returns:
        ``g(frozen, lora, *args, lora_key=None, **kwargs)``. Array arguments are traced; other
        arguments (Python numbers, strings, flags) reach ``fn`` as they are. LoRA dropout
        (``config.lora_dropout``) is on exactly when a PRNG key is given as ``lora_key``: it
        acts on the input of each factored low-rank term (a weight used folded takes none, as
        on the Flax path), with its own mask for each contraction and each step of a loop.

    Raises:
        ValueError: from ``g``, when ``lora`` does not fit ``frozen`` (as :func:`jaxlora.merge`).
        TypeError: when ``fn`` is not callable or ``config`` is not a ``LoraConfig``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> def mlp(params, x):
        ...     h = jax.nn.relu(x @ params["up"]["kernel"])
        ...     return h @ params["down"]["kernel"]
        >>> params = {"up": {"kernel": jnp.ones((4, 8))}, "down": {"kernel": jnp.ones((8, 2))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["up", "down"])
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> forward = jaxlora.factored(mlp, config)
        >>> x = jnp.ones((3, 4))
        >>> bool((forward(frozen, lora, x) == mlp(params, x)).all())  # B = 0: no change yet
        True
        >>> grads = jax.grad(lambda t: forward(frozen, t, x).sum())(lora)
        >>> sorted(grads["up"])
        ['lora_a', 'lora_b']
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a function fn(params, *args), got {type(fn).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")

    @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    def g(frozen: Params, lora: LoraTree, *args: Any, lora_key: Any = None, **kwargs: Any) -> Any:
        leaves, treedef = _paired(frozen, lora, config)
        values = [_lazy(x) if _is_adapted(x) else _dequantized(x) for x in leaves]
        # Arrays (and adapted weights) are traced; any other leaf (an Equinox model's activation
        # function, a Python number) reaches ``fn`` as it is, like the non-array arguments.
        weights = [k for k, v in enumerate(values) if _is_lazy(v) or _is_array(v)]
        shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype) if _is_lazy(v) else v
                  for v in (values[k] for k in weights)]  # fmt: skip
        arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
        traced = [k for k, x in enumerate(arg_leaves) if _is_array(x)]

        def flat_fn(traced_weights, traced_args):
            params_leaves = list(values)
            for k, x in zip(weights, traced_weights, strict=True):
                params_leaves[k] = x
            full = list(arg_leaves)
            for k, x in zip(traced, traced_args, strict=True):
                full[k] = x
            call_args, call_kwargs = jax.tree.unflatten(arg_tree, full)
            return fn(jax.tree.unflatten(treedef, params_leaves), *call_args, **call_kwargs)

        dynamic = [arg_leaves[k] for k in traced]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(shapes, dynamic)
        inputs = jax.tree.leaves(([values[k] for k in weights], dynamic), is_leaf=_is_lazy)
        key = lora_key if config.lora_dropout > 0 else None
        with lora_dropout.scope(key, config.lora_dropout):
            outs = interpret.run_folded(closed.jaxpr, closed.consts, *inputs)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    # g's own signature, not fn's: eqx.filter_jit and inspect.signature bind (frozen, lora, ...)
    del g.__wrapped__
    return g


def _is_lazy(x: Any) -> bool:
    return isinstance(x, lazy_weight.LazyWeight)
