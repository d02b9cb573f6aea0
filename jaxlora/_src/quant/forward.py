"""The factored forward on a quantised base: layers run on kernels dequantised inside the call.

Linen: :func:`dequantizing_interceptor` runs each layer whose params hold a
:class:`~jaxlora.quant.QuantizedKernel` on its dequantised kernel, keeping only the codes for the
backward pass; :func:`tie` keeps XLA from dequantising every kernel up front.

NNX: :func:`dequantizing_state` makes each quantised ``Param`` read as its dequantised kernel (an
adapted one as W inside its factored layer call, as ``W + s·A·B`` anywhere else), so layers run
unchanged while the low-rank term is added outside; within :func:`dequantizing_layers` each call
of a module holding a quantised ``Param`` keeps only the codes and its inputs for the backward
pass, as the linen interceptor does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from jaxlora._src.forward.adapted import AdaptedParam, AdaptedWeight, read
from jaxlora._src.forward.ties import tie_to
from jaxlora._src.quant.dequantize import dequantize, dequantize_tree
from jaxlora._src.quant.kernel import is_quantized
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


_WHOLE = object()  # no index given: the whole value


def _indexed(value: Any, index: Any) -> Any:
    value = dequantize(value) if is_quantized(value) else value
    return value if index is _WHOLE or index is Ellipsis else value[index]


class QuantizedParam(nnx.Param):
    """An NNX ``Param`` holding a :class:`~jaxlora.quant.QuantizedKernel`: reads give the
    dequantised kernel; ``shape`` and ``dtype`` are the float kernel's."""

    def get_value(self, *, index: Any = _WHOLE) -> Any:  # type: ignore[override]
        return _indexed(self.get_raw_value(), index)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.get_raw_value().shape

    @property
    def dtype(self) -> Any:
        return self.get_raw_value().dtype


class QuantizedAdaptedParam(AdaptedParam):
    """An :class:`AdaptedParam` over a quantised W: a read inside its factored layer call gives
    the dequantised W (the layer's own matmul), any other read ``W + s·A·B``."""

    def get_value(self, *, index: Any = _WHOLE) -> Any:  # type: ignore[override]
        return _indexed(self.get_raw_value().read(), index)


def _dequantizing(var: Any) -> Any:
    if not isinstance(var, nnx.Variable) or isinstance(var, QuantizedParam | QuantizedAdaptedParam):
        return var
    value = var.get_raw_value()
    metadata = {k: v for k, v in var.get_metadata().items() if k != "eager_sharding"}
    if isinstance(value, AdaptedWeight) and is_quantized(value.base):
        return QuantizedAdaptedParam(value, eager_sharding=False, **metadata)
    if is_quantized(value):
        return QuantizedParam(value, eager_sharding=False, **metadata)
    return var


def dequantizing_state(state: Any) -> Any:
    """``state`` (an ``nnx.State``) with each quantised kernel, adapted or not, in a ``Param``
    that reads as the float kernel: what an NNX layer needs to run on a quantised base.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jaxlora import quant
        >>> graphdef, state = nnx.split(nnx.Sequential(nnx.Linear(64, 4, rngs=nnx.Rngs(0))))
        >>> qstate = quant.quantize(state, ".*", "int8")
        >>> layer = nnx.merge(graphdef, dequantizing_state(qstate))
        >>> y = layer(jnp.ones((1, 64)))
        >>> ref = nnx.merge(graphdef, quant.dequantize_tree(qstate))(jnp.ones((1, 64)))
        >>> bool(jnp.allclose(y, ref))
        True
    """
    return jax.tree.map(_dequantizing, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _holds_quantized(module: Any) -> bool:
    return any(isinstance(v, QuantizedParam | QuantizedAdaptedParam) for v in vars(module).values())


def _nnx_dequantized_call(original: Callable[..., Any], module: nnx.Module, args, kwargs):
    """``original(module, *args, **kwargs)`` with a VJP that keeps the codes, the module's other
    state and the array inputs, and dequantises again once the cotangent exists."""
    graphdef, state = nnx.split(module)
    leaves, state_def = jax.tree.flatten(state, is_leaf=is_quantized)
    is_q = [is_quantized(x) for x in leaves]
    everything, args_def = jax.tree.flatten((args, kwargs))
    traced = [isinstance(x, jax.Array) for x in everything]

    def call(qleaves, fleaves, arrays):
        q, f, a = iter(qleaves), iter(fleaves), iter(arrays)
        inner = nnx.merge(graphdef, jax.tree.unflatten(state_def, [
            next(q) if quantized else next(f) for quantized in is_q]))  # fmt: skip
        full = [next(a) if t else x for x, t in zip(everything, traced, strict=True)]
        inner_args, inner_kwargs = jax.tree.unflatten(args_def, full)
        return original(inner, *inner_args, **inner_kwargs)

    @jax.custom_vjp
    def run(qleaves, fleaves, arrays):
        return call(tie(qleaves, arrays), fleaves, arrays)

    def forward(qleaves, fleaves, arrays):
        return run(qleaves, fleaves, arrays), (qleaves, fleaves, arrays)

    def backward(residuals, cotangent):
        qleaves, fleaves, arrays = residuals
        tied = tie(qleaves, cotangent)
        _, vjp = jax.vjp(lambda f, a: call(tied, f, a), fleaves, arrays)
        return (None, *vjp(cotangent))

    run.defvjp(forward, backward)
    qleaves = [x for x, q in zip(leaves, is_q, strict=True) if q]
    fleaves = [x for x, q in zip(leaves, is_q, strict=True) if not q]
    arrays = [x for x, t in zip(everything, traced, strict=True) if t]
    return run(qleaves, fleaves, arrays)


_LOCK = threading.Lock()


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self, *args, **kwargs):
        if not _holds_quantized(self):
            return original(self, *args, **kwargs)
        return _nnx_dequantized_call(original, self, args, kwargs)

    return call


@contextlib.contextmanager
def dequantizing_layers(root: nnx.Module) -> Iterator[None]:
    """Within the block, each ``__call__`` of a module of ``root`` whose own ``Param`` is
    quantised (:func:`dequantizing_state`) keeps only the codes for the backward pass, which
    dequantises again: no float copy of a kernel outlives its layer. Enter it inside the NNX
    LoRA hooks, so the wrapped call adds the low-rank term too."""
    classes = list(dict.fromkeys(type(m) for _, m in nnx.iter_modules(root) if _holds_quantized(m)))
    with _LOCK:
        saved = [(cls, cls.__dict__.get("__call__")) for cls in classes]
        for cls in classes:
            cls.__call__ = _wrap(cls.__call__)
    try:
        yield
    finally:
        with _LOCK:
            for cls, own in reversed(saved):
                if own is None:
                    del cls.__call__
                else:
                    cls.__call__ = own
