"""Reading kernel layouts off a model: a linen module by an abstract trace (no parameters are
allocated), an NNX module by its layers' own attributes (no trace at all)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxlora._src import paths
from jaxlora._src.axes import as_tuple
from jaxlora._src.config import axes_order, conventions
from jaxlora._src.config.targets import EMBEDDING, KERNEL


def _einsum_layout(einsum_str: str | None) -> str | None:
    """The layout of an Einsum kernel, or None when no layout describes it (a summed-away kernel
    axis, a batch axis after another kind, no input or no output axis)."""
    spec = (einsum_str or "").replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return None
    layout = axes_order.einsum_layout(spec)
    return layout if axes_order.layout_problem(layout) is None else None


def _linen_layout(module: nn.Module, call_args: tuple, call_kwargs: dict) -> str | None:
    """The layout of a linen layer's own (unstacked) kernel, or None if it has none we know."""
    if isinstance(module, nn.Dense | nn.Embed):
        return "io"
    if isinstance(module, nn.DenseGeneral):
        n_in = len(as_tuple(module.axis))
        n_out = len(as_tuple(module.features))
        return "s" * len(as_tuple(module.batch_dims)) + "i" * n_in + "o" * n_out
    if isinstance(module, nn.Conv):
        return "w" * len(as_tuple(module.kernel_size)) + "io"
    if isinstance(module, nn.Einsum):
        # A spec given to the call (`einsum_str=`) wins; other methods' arguments are arrays.
        spec = call_args[1] if len(call_args) > 1 else call_kwargs.get("einsum_str")
        return _einsum_layout(spec if isinstance(spec, str) else module.einsum_str)
    return None


def _nnx_layout(module: nnx.Module) -> tuple[str, str] | None:
    """``(weight leaf name, layout of the layer's own kernel)`` of an NNX layer, or None."""
    if isinstance(module, nnx.Embed):
        return EMBEDDING, "io"
    if isinstance(module, nnx.Linear):
        return KERNEL, "io"
    if isinstance(module, nnx.LinearGeneral):
        n_batch = len(module.batch_axis)
        return KERNEL, "s" * n_batch + "i" * len(module.in_features) + "o" * len(
            module.out_features
        )
    if isinstance(module, nnx.Conv):
        return KERNEL, "w" * len(as_tuple(module.kernel_size)) + "io"
    if isinstance(module, nnx.Einsum):
        layout = _einsum_layout(module.einsum_str)
        return None if layout is None else (KERNEL, layout)
    return None


def _stacked(layout: str | None, shape: tuple[int, ...]) -> str | None:
    """``layout`` with one leading ``s`` per extra (stacked) axis of ``shape``."""
    if layout is None or len(shape) < len(layout):
        return None
    return "s" * (len(shape) - len(layout)) + layout


def _infer_nnx(module: nnx.Module) -> dict[str, str]:
    layouts = {}
    for path, layer in nnx.iter_modules(module):
        found = _nnx_layout(layer)
        if found is None:
            continue
        leaf, layer_layout = found
        weight = getattr(layer, leaf, None)
        layout = _stacked(layer_layout, tuple(weight.shape)) if weight is not None else None
        if layout is not None and path:
            layouts[paths.join(str(key) for key in path)] = layout
    return layouts


def _infer_linen(module: nn.Module, args, method, kwargs) -> dict[str, str]:
    cls = type(module)
    if isinstance(method, str) and not callable(getattr(cls, method, None)):
        own = sorted(n for n in set(dir(cls)) - set(dir(nn.Module)) if callable(getattr(cls, n)))
        raise ValueError(
            f"`method`={method!r} is not a method of the model ({cls.__name__}); its methods: {own}"
        )
    seen: dict[tuple[str, ...], str] = {}

    def record(next_fun, call_args, call_kwargs, context):
        layout = _linen_layout(context.module, call_args, call_kwargs)
        if layout is not None and context.module.path:
            seen[tuple(context.module.path)] = layout
        return next_fun(*call_args, **call_kwargs)

    def init():
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        with nn.intercept_methods(record):
            return module.init(rngs, *args, method=method, **kwargs)

    params = jax.eval_shape(init).get("params", {})
    layouts = {}
    for _keys, names, leaf in paths.flatten(params):
        if names[-1] in (KERNEL, EMBEDDING):
            layout = _stacked(seen.get(tuple(names[:-1])), tuple(leaf.shape))
            if layout is not None:
                layouts[paths.join(names[:-1])] = layout
    return layouts


def _is_equinox(module: Any) -> bool:
    eqx = sys.modules.get("equinox")  # never imported here: an Equinox model means it was
    return eqx is not None and isinstance(module, eqx.Module)


def _holds_kernels(params: Any) -> bool:
    return any(names and names[-1] == KERNEL and len(getattr(leaf, "shape", ())) >= 2
               for _, names, leaf in paths.flatten(params))  # fmt: skip


def infer_layouts(
    module: nn.Module | nnx.Module | Callable[..., Any],
    *args: Any,
    method: Any = None,
    **kwargs: Any,
) -> dict[str, str]:
    """Layouts of every Dense / DenseGeneral / Einsum / Conv / Embed kernel of a linen or NNX
    model (``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` / ``Embed``), or of every
    ``weight`` of an Equinox model (``eqx.nn.Linear`` ``"oi"``, ``Conv2d`` ``"oiww"``,
    ``Embedding`` ``"io"``, a leading ``s`` per stacked axis, any other 2-D ``weight`` ``"oi"``).

    Equinox layouts need not be passed to ``LoraConfig``: every function reads them off the tree
    itself; this call shows what they are.

    A plain function ``fn(params, *inputs)`` is called as ``infer_layouts(fn, params, *inputs)``:
    it is traced abstractly and each kernel's axes are read off the contractions that use it
    (contracted: ``i``, kept: ``o``, batched, scanned or indexed over: ``s``, a convolution's
    window: ``w``), through transposes, reshapes, calls and control flow; a kernel used
    inconsistently or in no contraction is left out.

    A linen model is initialised under ``jax.eval_shape`` with ``nn.intercept_methods`` watching
    each layer, so nothing is allocated. An NNX model already holds its layers: each one's layout
    is read off its attributes (``in_features``, ``einsum_str``, ...) and its kernel's shape, with
    no trace; sample inputs may be passed (so one call serves both) and are ignored. Layers inside
    ``nn.scan`` / ``nn.vmap`` (or ``nnx.vmap`` / ``nnx.scan``) get their stacked axes as leading
    ``s``. Einsum kernels take their axes in any order (``"btd,ndh->btnh"`` gives ``"oio"``);
    those no layout describes (an axis summed away, a batch axis after the others) are left out.

    Args:
        module: a linen module, an NNX module, or a function ``fn(params, *inputs)``.
        *args: linen: sample inputs (arrays or ``jax.ShapeDtypeStruct``), as for ``module.init``;
            a function: its params, then its sample inputs.
        method: linen: the method to trace, as for ``module.init``.
        **kwargs: linen: keyword inputs for ``module.init``.

    Returns:
        ``{module path: layout}``, ready for ``LoraConfig(layouts=...)``.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> infer_layouts(attn, jnp.ones((1, 3, 8)))
        {'key': 'ioo', 'out': 'iio', 'query': 'ioo', 'value': 'ioo'}
        >>> from flax import nnx
        >>> attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
        >>> infer_layouts(attn)
        {'key': 'ioo', 'out': 'iio', 'query': 'ioo', 'value': 'ioo'}
        >>> import equinox as eqx
        >>> infer_layouts(eqx.nn.MLP(2, 3, 4, 1, key=jax.random.key(0)))
        {'layers/0': 'oi', 'layers/1': 'oi'}
        >>> def proj(params, x):  # a weight stored (out, in), and a scanned stack
        ...     h = x @ params["proj"]["kernel"].T
        ...     return jax.lax.scan(lambda h, w: (h @ w, None), h, params["stack"]["kernel"])[0]
        >>> params = {"proj": {"kernel": jnp.ones((4, 8))},
        ...           "stack": {"kernel": jnp.ones((3, 4, 4))}}
        >>> infer_layouts(proj, params, jnp.ones((2, 8)))
        {'proj': 'oi', 'stack': 'sio'}
    """
    if isinstance(module, nnx.Module):
        return _infer_nnx(module)
    if _is_equinox(module):  # an Equinox model is callable too: before the function form
        return conventions.tree_layouts(module)
    is_function = callable(module) and not isinstance(module, type | nn.Module)
    if is_function and args and _holds_kernels(args[0]):
        from jaxlora._src.forward.trace_layouts import function_layouts  # forward imports config

        return function_layouts(module, *args, **kwargs)
    if not isinstance(module, nn.Module):
        what = "a Module class" if isinstance(module, type) else type(module).__name__
        raise TypeError(
            f"`module` must be a flax.linen, nnx or Equinox Module instance, got {what} "
            f"({module!r:.60});"
            " pass the model object itself (e.g. `MyModel()`), not its `apply` or `__call__` or"
            " the class: layouts are read off the model's layers; or a plain function"
            " `fn(params, *inputs)` followed by its params (holding 'kernel' leaves) and inputs"
        )
    return _infer_linen(module, args, method, kwargs)
