"""Weight conventions of the trees jaxlora adapts: which leaves are weights and how their axes read.

Flax names its weights ``kernel`` (Dense/Conv/Einsum, inputs first: ``(in, out)``, a conv
``(*window, in, out)``) and ``embedding`` (``(vocab, dim)``). Equinox and PyTorch-style pytrees name
theirs ``weight``, outputs first: a Linear ``(out, in)``, a Conv ``(out, in, *window)``, an
Embedding ``(vocab, dim)``. The leaf name alone tells a 2-D ``weight`` (layout ``"oi"``); an
Equinox layer in the tree tells the rest: an ``eqx.nn.Embedding`` table is an embedding (``"io"``,
looked up by row), an ``eqx.nn.Conv`` kernel ``"oi" + "w" * n``, and a layer whose weight has
extra leading axes (``eqx.filter_vmap``-made stacks) gets them as ``s``.

An Equinox normalisation layer's ``weight`` is a per-feature scale, never a target, even when
stacking layers makes it 2-D. Other Equinox layers are not read: a ``ConvTranspose`` or a 3-D
``weight`` outside a known layer needs ``LoraConfig.layouts``, and a cell's ``weight_ih`` /
``weight_hh`` are no ``weight`` leaf.

These defaults reach every function through :func:`with_tree_layouts`, which adds them, after the
user's own ``LoraConfig.layouts`` patterns (those win), to the config a call works with. Equinox is
never imported here: a tree can only hold Equinox modules once the user has imported it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.types import Params

#: Flax's weight leaf names: Dense/Conv/Einsum kernels (inputs first) and Embed tables.
KERNEL = "kernel"
EMBEDDING = "embedding"
#: Equinox's (and PyTorch's) weight leaf name: outputs first.
WEIGHT = "weight"
#: Every leaf name LoRA can adapt.
WEIGHT_LEAVES = (KERNEL, EMBEDDING, WEIGHT)


#: Equinox layers whose ``weight`` scales features instead of being contracted: never adapted,
#: though a stacked one (``eqx.filter_vmap``-made) has a 2-D ``weight`` like a Linear's.
_EQUINOX_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm")


def _equinox_layers() -> tuple[type, ...]:
    """``(Linear, Conv, Embedding)`` of Equinox when it is imported, else ``()``."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return ()
    return (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.Embedding)


def _equinox_norms() -> tuple[type, ...]:
    """Equinox's normalisation layers (:data:`_EQUINOX_NORMS`) when it is imported, else ``()``."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return ()
    return tuple(getattr(eqx.nn, name) for name in _EQUINOX_NORMS if hasattr(eqx.nn, name))


def _layer_weights(params: Params, layers: tuple[type, ...]) -> Iterator[tuple[str, Any, Any]]:
    """``(module path, layer, its weight)`` of every instance of ``layers`` in ``params`` that
    holds an array ``weight`` (an ``eqx.partition`` half without it is skipped)."""
    if not layers:
        return
    is_layer = lambda x: isinstance(x, layers)  # noqa: E731
    for keypath, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_layer)[0]:
        weight = getattr(node, WEIGHT, None) if is_layer(node) else None
        if getattr(weight, "shape", None) is not None:
            yield paths.join(paths.leaf_path(keypath)), node, weight


def _layer_layout(layer: Any, ndim: int) -> tuple[str, bool] | None:
    """``(layout, is embedding)`` of an Equinox layer whose weight has ``ndim`` axes."""
    eqx = sys.modules["equinox"]
    if isinstance(layer, eqx.nn.Embedding):
        own, embed = "io", True
    elif isinstance(layer, eqx.nn.Conv):
        own, embed = "oi" + "w" * int(layer.num_spatial_dims), False
    else:
        own, embed = "oi", False
    if ndim < len(own):
        return None
    return "s" * (ndim - len(own)) + own, embed


def equinox_layers(params: Params) -> dict[str, tuple[str, bool]]:
    """``{module path: (layout, is embedding)}`` of every Equinox Linear / Conv / Embedding layer
    in ``params`` that holds its weight (an ``eqx.partition`` half without it is skipped).

    Example:
        >>> import equinox as eqx, jax
        >>> equinox_layers({"head": eqx.nn.Linear(3, 2, key=jax.random.key(0))})
        {'head': ('oi', False)}
    """
    found = {}
    for path, layer, weight in _layer_weights(params, _equinox_layers()):
        layout = _layer_layout(layer, len(weight.shape))
        if layout is not None:
            found[path] = layout
    return found


def tree_layouts(params: Params) -> dict[str, str]:
    """``{module path: layout}`` the tree's own conventions give: Equinox layers as they are
    (:func:`equinox_layers`), any other 2-D ``weight`` leaf ``"oi"`` (PyTorch's ``(out, in)``).

    Example:
        >>> import jax.numpy as jnp
        >>> tree_layouts({"fc": {"weight": jnp.zeros((4, 3))}, "d": {"kernel": jnp.zeros((3, 4))}})
        {'fc': 'oi'}
    """
    found = {path: layout for path, (layout, _) in equinox_layers(params).items()}
    norms = norm_paths(params)
    for _, names, leaf in paths.flatten(params):
        shape = getattr(leaf, "shape", None)
        if names and names[-1] == WEIGHT and shape is not None and len(shape) == 2:
            if paths.join(names[:-1]) not in norms:
                found.setdefault(paths.join(names[:-1]), "oi")
    return found


def _exact(module_paths: list[str]) -> str:
    """A ``LoraConfig.layouts`` pattern matching exactly ``module_paths``, never a suffix of a
    longer path (``(?<!.)`` holds only at the start of the path)."""
    return "(?<!.)(?:" + "|".join(re.escape(p) for p in sorted(module_paths)) + ")"


def with_layouts_of(layouts: Mapping[str, str], params: Params) -> dict[str, str]:
    """``layouts`` (``LoraConfig.layouts`` patterns) followed by the tree's own conventions
    (:func:`tree_layouts`), which the user's patterns override: one exact-path pattern per
    distinct layout, so a model with thousands of layers adds a handful of patterns.

    Example:
        >>> import jax.numpy as jnp
        >>> with_layouts_of({"q": "io"}, {"fc": {"weight": jnp.zeros((4, 3))}})
        {'q': 'io', '(?<!.)(?:fc)': 'oi'}
    """
    by_layout: dict[str, list[str]] = {}
    for path, layout in tree_layouts(params).items():
        by_layout.setdefault(layout, []).append(path)
    out = dict(layouts)
    for layout, module_paths in sorted(by_layout.items()):
        out.setdefault(_exact(module_paths), layout)
    return out


def with_tree_layouts(config: LoraConfig, params: Params) -> LoraConfig:
    """``config`` whose ``layouts`` also hold the tree's own conventions (:func:`with_layouts_of`);
    ``config`` itself for a tree without ``weight`` leaves (Flax). What a call works with; never
    returned to the user nor saved.
    """
    if not isinstance(config, LoraConfig):  # the caller's own check names the argument
        return config
    layouts = with_layouts_of(config.layouts, params)
    if len(layouts) == len(config.layouts):
        return config
    return dataclasses.replace(config, layouts=layouts)


def norm_paths(params: Params) -> set[str]:
    """Module paths of Equinox normalisation layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm):
    their ``weight`` is a per-feature scale, never a LoRA target, even stacked to 2-D.

    Example:
        >>> import equinox as eqx
        >>> norm_paths({"ln": eqx.nn.LayerNorm(4), "ln_off": eqx.nn.LayerNorm(4, use_weight=False)})
        {'ln'}
    """
    return {path for path, _, _ in _layer_weights(params, _equinox_norms())}


def embedding_paths(params: Params) -> set[str]:
    """Module paths whose ``weight`` is an embedding table (an ``eqx.nn.Embedding``)."""
    return {path for path, (_, embed) in equinox_layers(params).items() if embed}
