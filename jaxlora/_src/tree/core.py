"""``split``, ``merge`` and ``unmerge``: LoRA as pure functions over parameter pytrees.

``split`` leaves the base params untouched (they are the frozen tree) and builds the adapter Θ, a
nested dict mirroring the params nesting that holds only what trains: ``lora_a`` / ``lora_b`` beside
each adapted kernel, plus copies of trainable biases and ``modules_to_save``. ``merge`` folds Θ into
the base, ``W + s·A·B``, and returns params of the original structure, shapes and dtypes.

Each adapted module runs a variant (:mod:`jaxlora._src.variants`), told from the leaves it holds:
plain LoRA, or DoRA when it holds a ``lora_magnitude``. ``split(..., variant=...)`` picks the one a
fresh adapter gets; ``merge`` and ``unmerge`` fold every module through its own variant.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config import axes_order
from jaxlora._src.config.conventions import with_tree_layouts
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import Target, find_targets, find_trainable_leaves
from jaxlora._src.quant.dequantize import dequantize_tree
from jaxlora._src.tree import checks, count
from jaxlora._src.tree.pairing import adapter_for
from jaxlora._src.types import LORA_A, LORA_B, LoraTree, Params, PRNGKey
from jaxlora._src.variants import base as variants
from jaxlora._src.variants.lora import delta as delta


def path_key(key: PRNGKey, path: str) -> PRNGKey:
    """``key`` folded with a hash of the module ``path``: the key a target's initial factors use.

    Keyed by path, so adding a target elsewhere never changes another target's initial values.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_factors(target: Target, config: LoraConfig, key: PRNGKey) -> tuple[jax.Array, jax.Array]:
    """Initial ``(a, b)`` for one target, following PEFT's ``init_lora_weights`` modes.

    Dense and conv: A ~ U(±1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)) or, for ``"gaussian"``,
    N(0, 1/r²); B = 0. Embeddings, as in PEFT: A = 0, B ~ N(0, 1). With ``init_lora_weights=False``
    neither factor is zero, so the adapter changes the model (for debugging).
    """
    dtype = jnp.dtype(config.dtype)
    key_a, key_b = jax.random.split(path_key(key, target.path))
    a_shape, b_shape = target.a_shape, target.b_shape
    mode = config.init_lora_weights
    if target.kind == "embed":
        b = jax.random.normal(key_b, b_shape, dtype)
        a = jax.random.normal(key_a, a_shape, dtype) if mode is False else jnp.zeros(a_shape, dtype)
        return a, b
    if mode == "gaussian":
        a = jax.random.normal(key_a, a_shape, dtype) / target.rank
    else:
        bound = 1.0 / target.fan_in**0.5
        a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
    if mode is False:
        bound_b = 1.0 / target.rank**0.5
        b = jax.random.uniform(key_b, b_shape, dtype, -bound_b, bound_b)
    else:
        b = jnp.zeros(b_shape, dtype)
    return a, b


def split(
    params: Params, config: LoraConfig, key: PRNGKey, *, variant: str = "lora"
) -> tuple[Params, LoraTree]:
    """Splits ``params`` into the frozen base and a fresh adapter Θ.

    Args:
        params: a params pytree: a linen ``params`` dict, an ``nnx.State``, an Equinox module or
            its ``eqx.partition`` arrays, a dataclass / NamedTuple / list / tuple pytree, dicts
            with any keys. Of a full ``nnx.State`` only the ``nnx.Param`` variables are adapted
            or trained, never batch statistics, RNG state or other variables; of an Equinox
            module only its arrays. Module paths come from the tree's own keys
            (``layers/0/attn/q_proj``; PEFT files write ``layers.0.attn.q_proj``). Weights are
            Flax's ``kernel`` (in, out) / ``embedding`` or Equinox's and PyTorch's ``weight``
            (out, in) (:mod:`jaxlora._src.config.conventions`).
        config: which modules to adapt and how.
        key: PRNG key for the adapter's initial values.
        variant: ``"lora"`` (plain LoRA) or ``"dora"`` (each module also gets DoRA's magnitude
            ``lora_magnitude``, see :mod:`jaxlora.variants`), or another registered variant.

    Returns:
        ``(frozen, lora)``: ``frozen`` is ``params`` itself (never modified); ``lora`` is a nested
        dict with ``lora_a`` / ``lora_b`` (and the variant's leaves) under each adapted module and
        copies of trainable leaves, keyed by the raw keys of the params tree (a list index or an
        int dict key stays an int) whatever the tree's types.
        Works under ``jax.jit`` and ``jax.eval_shape`` (with ``ShapeDtypeStruct`` params).

    Raises:
        ValueError: when the config matches nothing or is ambiguous for ``params``, for an unknown
            ``variant``, or for a target the variant cannot adapt (DoRA: an embedding).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"query": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["query"])
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> jax.tree.map(jnp.shape, lora)
        {'query': {'lora_a': (4, 2), 'lora_b': (2, 6)}}
    """
    require_config(config, "split")
    validate.prng_key("key", key)
    chosen = variants.get(variant)
    # Of a full nnx.State, only the parameters: batch statistics and RNG state never train.
    view = count.params_only(params)
    targets = find_targets(view, config, caller="split")
    trainable = find_trainable_leaves(view, config, targets)
    leaves = {keys: leaf for keys, _, leaf in paths.flatten(view)}
    lora: LoraTree = {}
    for target in targets:
        a, b = init_factors(target, config, key)
        paths.set_in(lora, target.keys + (LORA_A,), a)
        paths.set_in(lora, target.keys + (LORA_B,), b)
        weight = axes_order.to_canonical(leaves[target.keys + (target.leaf,)], target.layout)
        extras = chosen.init(target, weight, config)
        for name, value in extras.items():
            paths.set_in(lora, target.keys + (name,), value)
    for keys, _ in trainable:
        # A copy, so donating Θ to a jitted step never invalidates the frozen tree's buffers.
        paths.set_in(lora, keys, jnp.array(leaves[keys], copy=True))
    return params, lora


def _check_factors(where: str, leaf: str, weight, a, b, layout: str = "") -> int:
    """The number of stack axes of ``a`` / ``b``, checked to fit ``weight`` (in canonical order)."""
    n_stack = a.ndim + b.ndim - 2 - weight.ndim
    ok = (
        n_stack >= 0
        and a.shape[-1] == b.shape[n_stack]
        and a.shape[:-1] == tuple(weight.shape[: a.ndim - 1])
        and b.shape[:n_stack] == tuple(weight.shape[:n_stack])
        and b.shape[n_stack + 1 :] == tuple(weight.shape[a.ndim - 1 :])
    )
    if not ok:
        raise ValueError(
            f"`lora` factors at `{where}` do not fit the {leaf} {tuple(weight.shape)}: got "
            f"{LORA_A} {tuple(a.shape)} and {LORA_B} {tuple(b.shape)}, expected {LORA_A} of shape "
            f"stack + input + (r,) and {LORA_B} stack + (r,) + output"
            + (f" of the kernel's axes {layout!r} in that order" if layout else "")
            + "; was the adapter made for another model?"
        )
    return n_stack


def fold_module(module, names, weight, config: LoraConfig, sign: float):
    """One adapted weight folded through its module's variant, and the module leaves it used.

    ``module`` is the adapter's dict for the module (``lora_a``, ``lora_b``, the variant's leaves),
    ``names`` the weight's path (module path + leaf name), ``sign`` +1 to merge, -1 to unmerge.
    Shared by :func:`merge` / :func:`unmerge` and the factored forward, which folds the adapters
    it cannot run factored inside the forward pass.

    The axis order is ``config.layouts``' for the module path (shapes are ambiguous when sizes
    repeat; none matching: canonical, as in :func:`split`): W is transposed to the factors' order,
    folded by the variant and transposed back (:mod:`jaxlora._src.config.axes_order`).
    """
    where = paths.join(names[:-1])
    missing = [n for n in (LORA_A, LORA_B) if n not in module]
    if missing:
        have = next(n for n in variants.adapter_leaves() if n in module)
        raise ValueError(f"`lora` has `{have}` but no `{'`/`'.join(missing)}` at `{where}`")
    a, b = module[LORA_A], module[LORA_B]
    layout = axes_order.layout_at(config.layouts, where, names[-1], tuple(weight.shape))
    weight = axes_order.to_canonical(weight, layout)
    n_stack = _check_factors(where, names[-1], weight, a, b, layout)
    variant = variants.variant_of(module, where)
    variant.check(names[-1], where)
    extras = {n: module[n] for n in variant.extra_leaves}
    scale = config.scale_for(where, int(a.shape[-1]))
    fold = variant.merge if sign > 0 else variant.unmerge
    out = fold(weight, a, b, extras, scale, n_stack, where)
    return axes_order.from_canonical(out, layout), (LORA_A, LORA_B, *extras)


def _fold(params: Params, lora: LoraTree, config: LoraConfig, sign: float, what: str) -> Params:
    checks.require_tree(**{"frozen" if sign > 0 else "merged": params})
    config = with_tree_layouts(config, count.params_only(params))
    fold = lambda module, names, leaf: fold_module(module, names, leaf, config, sign)  # noqa: E731
    return map_adapted(dequantize_tree(params), lora, config, fold, what, copy=sign > 0)


def map_adapted(params: Params, lora: LoraTree, config: LoraConfig, fold, what: str, *,
                copy: bool = True, is_leaf=None) -> Params:  # fmt: skip
    """``params`` with each adapted weight replaced by ``fold(module_lora, names, weight)`` and,
    when ``copy``, each trainable copy of Θ in place of its base leaf. ``is_leaf`` as for
    ``jax.tree.map`` (e.g. to see a quantised kernel whole).

    Every leaf of ``lora`` must find its counterpart: this is the check that an adapter fits
    the params it is used with, shared by :func:`merge`, :func:`unmerge` and the factored forward.

    Raises:
        ValueError: naming the leaves of ``lora`` with no counterpart in ``params`` (``what`` names
            the caller), or a copy whose shape differs from its base leaf.
    """
    require_config(config, what)
    checks.check_lora_tree(lora, what)
    checks.check_adapter_config(params, lora, config, what)
    used: set[tuple[Any, ...]] = set()

    def fold_leaf(keys, names, leaf):
        replacement = adapter_for(lora, keys)
        if isinstance(replacement, Mapping):
            out, leaves = fold(replacement, names, leaf)
            used.update(keys[:-1] + (n,) for n in leaves)
            return out
        if replacement is not None:
            used.add(keys)
            if copy:
                if tuple(replacement.shape) != tuple(leaf.shape):
                    raise ValueError(
                        f"`lora` leaf `{paths.join(names)}` has shape {tuple(replacement.shape)} "
                        f"but the base leaf has {tuple(leaf.shape)}"
                    )
                return replacement.astype(leaf.dtype)
        return leaf

    out = paths.map_with_keys(fold_leaf, params, is_leaf)
    unused = [paths.join(map(str, k)) for k, _, _ in paths.flatten(lora) if k not in used]
    if unused:
        raise ValueError(
            f"`lora` leaves {paths.preview(unused)} have no counterpart in the params given to "
            f"`{what}`; was the adapter made for another model?"
        )
    return out


def merge(frozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """Folds the adapter into the base, each adapted module through its variant: plain LoRA
    kernels become ``W + s·A·B``, DoRA ones ``m · V / ‖V‖_c`` (:mod:`jaxlora.variants`).

    The update is computed in float32 and cast to W's dtype; trainable copies (biases,
    ``modules_to_save``) replace their base leaves. Quantised kernels of ``frozen``
    (:mod:`jaxlora.quant`) are dequantised first. The result has the structure, shapes and dtypes
    of (the dequantised) ``frozen`` and runs with the model's ordinary apply at no added cost: of
    an Equinox model, the same model class, its non-array fields returned as they came.

    Raises:
        ValueError: when a leaf of ``lora`` has no counterpart in ``frozen`` or does not fit it.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((3, 3))}}
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["dense"])
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> bool((jaxlora.merge(frozen, lora, config)["dense"]["kernel"] == 1).all())
        True
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0), variant="dora")
        >>> bool((jaxlora.merge(frozen, lora, config)["dense"]["kernel"] == 1).all())
        True
    """
    return _fold(frozen, lora, config, 1.0, "merge")


def unmerge(merged: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """The inverse of :func:`merge` for the factors: each plain LoRA kernel becomes ``W - s·A·B``.

    Trainable copies (biases, ``modules_to_save``) stay as they are in ``merged``: the adapter
    holds only their trained values, not the originals.

    Raises:
        ValueError: for a DoRA module (its merge cannot be undone: keep the base and merge again),
            or when a leaf of ``lora`` has no counterpart in ``merged`` or does not fit it.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((3, 3))}}
        >>> config = jaxlora.LoraConfig(r=1, target_modules=["dense"], init_lora_weights=False)
        >>> frozen, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> back = jaxlora.unmerge(jaxlora.merge(frozen, lora, config), lora, config)
        >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0, atol=1e-6))
        True
    """
    return _fold(merged, lora, config, -1.0, "unmerge")
