"""The factored forward on a quantised base: layers run on kernels dequantised inside the call.

:func:`dequantizing_interceptor` runs each layer whose params hold a
:class:`~jaxlora.quant.QuantizedKernel` on its dequantised kernel, keeping only the codes for the
backward pass; :func:`tie` keeps XLA from dequantising every kernel up front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxlora._src.forward.adapted import read
from jaxlora._src.forward.ties import tie_to
from jaxlora._src.quant.kernel import dequantize_tree, is_quantized
from jaxlora._src.types import Params


def tie(tree: Params, anchor: Any) -> Params:
    """``tree`` with ``0·anchor`` added to the codes and a float scale of each
    :class:`~jaxlora.quant.QuantizedKernel`.

    The values do not change, but each kernel's dequantisation now depends on ``anchor`` (a layer
    input, or the cotangent in the backward pass), so XLA cannot hoist it to the start of the
    program. XLA:CPU drops ``optimization_barrier`` and, without a data dependence, computes every
    kernel's float copy up front and keeps them all live, which undoes the memory saving.
    """

    def tie_leaf(leaf):
        if not is_quantized(leaf):
            return leaf
        # Both the codes and a float scale: unpacking the codes alone is a full-size temporary.
        field = "scale_scale" if leaf.scale_scale is not None else "scale"
        value = getattr(leaf, field)
        codes = tie_to(leaf.codes, anchor)
        return dataclasses.replace(leaf, codes=codes, **{field: tie_to(value, anchor)})

    return jax.tree.map(tie_leaf, tree, is_leaf=is_quantized)


def _dequantized_call(layer, method: str, kwargs: dict) -> Callable[..., Any]:
    """``f(qparams, fparams, args)``: the layer on dequantised kernels, with a VJP that keeps only
    the codes and inputs and dequantises again once the cotangent exists."""

    def call(qparams, fparams, args):
        variables = {"params": {**fparams, **dequantize_tree(qparams)}}
        return layer.apply(variables, *args, method=method, **kwargs)

    @jax.custom_vjp
    def run(qparams, fparams, args):
        return call(tie(qparams, args[0]), fparams, args)

    def forward(qparams, fparams, args):
        return run(qparams, fparams, args), (qparams, fparams, args)

    def backward(residuals, cotangent):
        qparams, fparams, args = residuals
        tied = tie(qparams, jax.tree.leaves(cotangent)[0])
        _, vjp = jax.vjp(lambda f, a: call(tied, f, a), fparams, args)
        return (None, *vjp(cotangent))

    run.defvjp(forward, backward)
    return run


def dequantizing_interceptor() -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that runs layers whose params hold a
    :class:`QuantizedKernel` on the dequantised kernel. Only the codes and the layer inputs are
    kept for the backward pass, which dequantises again (and re-runs the layer's forward to get
    its VJP), so no float copy of a kernel outlives its use.

    Enter it *inside* the LoRA interceptor, so that it is the last one called before the layer:
    ``with nn.intercept_methods(lora_interceptor(config)), nn.intercept_methods(interceptor()):``.
    An adapted kernel reaches the layer as W inside its factored call (the LoRA interceptor adds
    the term outside) and as W + s·A·B in any other call; float params beside the kernel (a bias,
    trainable or not) get their gradients as usual.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        params = module.variables.get("params", {}) if context.method_name in (
            "__call__", "attend") else {}  # fmt: skip
        # An adapted kernel reads as W inside its factored call, as W + s·A·B anywhere else.
        params = {k: read(v) for k, v in params.items()}
        if not args or not any(is_quantized(v) for v in params.values()):
            return next_fun(*args, **kwargs)
        qparams = {k: v for k, v in params.items() if is_quantized(v)}
        fparams = {k: v for k, v in params.items() if not is_quantized(v)}
        run = _dequantized_call(module.clone(parent=None), context.method_name, kwargs)
        return run(qparams, fparams, tuple(args))

    return intercept
