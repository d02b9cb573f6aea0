"""Reading kernel layouts off a linen module by an abstract trace (no parameters are allocated)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxlora._src import paths
from jaxlora._src.axes import as_tuple
from jaxlora._src.config.lora_config import LAYOUT_PATTERN
from jaxlora._src.config.targets import EMBEDDING, KERNEL


def _einsum_layout(einsum_str: str) -> str | None:
    spec = einsum_str.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        return None
    lhs, out = spec.split("->")
    x, kernel = lhs.split(",")
    letters = "".join(
        ("s" if c in out else "i") if c in x else ("o" if c in out else "?") for c in kernel
    )
    return letters if LAYOUT_PATTERN.fullmatch(letters) else None


def _module_layout(module: nn.Module) -> str | None:
    """The layout of the module's own (unstacked) kernel, or None if it has none we know."""
    if isinstance(module, nn.Dense | nn.Embed):
        return "io"
    if isinstance(module, nn.DenseGeneral):
        n_in = len(as_tuple(module.axis))
        n_out = len(as_tuple(module.features))
        return "s" * len(as_tuple(module.batch_dims)) + "i" * n_in + "o" * n_out
    if isinstance(module, nn.Conv):
        return "w" * len(as_tuple(module.kernel_size)) + "io"
    if isinstance(module, nn.Einsum):
        return _einsum_layout(module.einsum_str)
    return None


def infer_layouts(
    module: nn.Module, *args: Any, method: Any = None, **kwargs: Any
) -> dict[str, str]:
    """Layouts of every Dense / DenseGeneral / Einsum / Conv / Embed kernel of a linen model.

    The model is initialised under ``jax.eval_shape`` with ``nn.intercept_methods`` watching
    each layer, so nothing is allocated. Layers inside ``nn.scan`` / ``nn.vmap`` get their stacked
    axes as leading ``s``. Einsum kernels whose axes are not ordered stack, input, output are left
    out (the merged path cannot split them into two factors).

    Args:
        module: a linen module.
        *args: sample inputs (arrays or ``jax.ShapeDtypeStruct``), as for ``module.init``.
        method: the method to trace, as for ``module.init``.
        **kwargs: keyword inputs for ``module.init``.

    Returns:
        ``{module path: layout}``, ready for ``LoraConfig(layouts=...)``.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
        >>> infer_layouts(attn, jnp.ones((1, 3, 8)))
        {'key': 'ioo', 'out': 'iio', 'query': 'ioo', 'value': 'ioo'}
    """
    seen: dict[tuple[str, ...], str] = {}

    def record(next_fun, call_args, call_kwargs, context):
        layout = _module_layout(context.module)
        if layout is not None and context.module.path:
            seen[tuple(context.module.path)] = layout
        return next_fun(*call_args, **call_kwargs)

    def init():
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        with nn.intercept_methods(record):
            return module.init(rngs, *args, method=method, **kwargs)

    variables = jax.eval_shape(init)
    params = variables.get("params", {})
    layouts = {}
    for _keys, names, leaf in paths.flatten(params):
        if names[-1] not in (KERNEL, EMBEDDING):
            continue
        layout = seen.get(tuple(names[:-1]))
        n_stack = len(leaf.shape) - len(layout) if layout is not None else -1
        if n_stack >= 0:
            layouts[paths.join(names[:-1])] = "s" * n_stack + layout
    return layouts
