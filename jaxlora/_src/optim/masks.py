"""Freezing for users who keep one combined params tree: masks, labels and an optax wrapper.

The recommended loop differentiates only w.r.t. Θ (``jax.grad(loss)(lora, frozen, batch)``), which
freezes the base by construction. When a training script keeps a single tree instead (the output
of :func:`jaxlora.combine`), these helpers make optax update only Θ's leaves and keep optimizer
state for those alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import BIAS, find_targets
from jaxlora._src.types import ADAPTER_LEAVES, LORA_A, LoraTree, Params

TRAINABLE = "trainable"
FROZEN = "frozen"


def _is_trainable(combined: Params, config: LoraConfig, keys: tuple[Any, ...], names) -> bool:
    if names[-1] in ADAPTER_LEAVES:
        return True
    if names[-1] == BIAS:
        if config.bias == "all":
            return True
        module = paths.get_in(combined, keys[:-1])
        if config.bias == "lora_only" and isinstance(module, Mapping) and LORA_A in module:
            return True
    prefixes = [paths.join(names[:k]) for k in range(1, len(names))]
    return any(
        paths.matches_literal(name, prefix)
        for name in config.modules_to_save or ()
        for prefix in prefixes
    )


def _check_combined(combined: Any, config: LoraConfig, where: str, factors: bool = True) -> None:
    """``combined`` must be a tree (with factors, when ``factors`` and ``config`` targets any)."""
    require_config(config, where)
    if combined is None or jax.tree_util.treedef_is_leaf(jax.tree.structure(combined)):
        raise TypeError(
            f"`combined` (in `{where}`) must be the combined params tree, a nested dict from "
            f"`jaxlora.combine(frozen, lora)` (or any params pytree holding Θ's leaves), got "
            f"{type(combined).__name__}"
        )
    _check_saved(combined, config, where)
    names = {n[-1] for _, n, _ in paths.flatten(combined) if n}
    if factors and config.target_modules is not None and LORA_A not in names:
        raise ValueError(
            f"`combined` (in `{where}`) holds no `lora_a` / `lora_b` factors, but `config` "
            f"targets modules (`target_modules`={config.target_modules!r}): it looks like the "
            "plain base. Pass `jaxlora.combine(frozen, lora)`"
        )


def _check_saved(combined: Params, config: LoraConfig, where: str) -> None:
    """As :func:`jaxlora.split`: each ``modules_to_save`` entry must name a module of the tree."""
    modules = {paths.join(names[:k]) for _, names, _ in paths.flatten(combined)
               for k in range(1, len(names))}  # fmt: skip
    missing = [n for n in config.modules_to_save or () if not any(_saved_in(n, m) for m in modules)]
    if missing:
        raise ValueError(
            f"`modules_to_save` entries {missing} match no module of the tree given to `{where}`; "
            f"modules seen: {paths.preview(sorted(modules))}"
        )


def _saved_in(name: str, module: str) -> bool:
    return paths.matches_literal(name, module)


def trainable_mask(combined: Params, config: LoraConfig) -> Params:
    """A tree of bools, True on Θ's leaves, for ``optax.masked``.

    Example:
        >>> import jaxlora
        >>> tree = {"d": {"kernel": 0.0, "bias": 0.0, "lora_a": 0.0, "lora_b": 0.0}}
        >>> trainable_mask(tree, jaxlora.LoraConfig(bias="lora_only"))
        {'d': {'bias': True, 'kernel': False, 'lora_a': True, 'lora_b': True}}
    """
    _check_combined(combined, config, "trainable_mask")
    return _mask(combined, config)


def _mask(combined: Params, config: LoraConfig) -> Params:
    return jax.tree.map_with_path(
        lambda kp, _: _is_trainable(combined, config, paths.leaf_keys(kp), paths.leaf_path(kp)),
        combined,
    )


def trainable_labels(combined: Params, config: LoraConfig) -> Params:
    """``"trainable"`` / ``"frozen"`` per leaf, for ``optax.multi_transform``."""
    mask = trainable_mask(combined, config)
    return jax.tree.map(lambda flag: TRAINABLE if flag else FROZEN, mask)


def freeze(
    optimizer: optax.GradientTransformation, config: LoraConfig
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so it updates only Θ's leaves of a combined tree.

    The frozen leaves get ``optax.set_to_zero()`` updates and no optimizer state, so the state is
    the size of Θ, not of the model.

    Example:
        >>> import jax.numpy as jnp, optax, jaxlora
        >>> tree = {"d": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 1)),
        ...               "lora_b": jnp.zeros((1, 4))}}
        >>> opt = jaxlora.freeze(optax.adam(1e-3), jaxlora.LoraConfig())
        >>> state = opt.init(tree)
        >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim) // 2  # Adam's two moments
        8
    """
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"`optimizer` must be an optax GradientTransformation, got {optimizer!r:.60} "
            f"({type(optimizer).__name__}); build it first, e.g. `optax.adam(1e-3)`"
        )
    require_config(config, "freeze")
    inner = optax.multi_transform(
        {TRAINABLE: optimizer, FROZEN: optax.set_to_zero()}, lambda tree: _labels(tree, config)
    )

    def update(updates, state, params=None, **extra):
        if params is not None and jax.tree.structure(updates) != jax.tree.structure(params):
            raise ValueError(_structure_message("`updates` do not have the structure of "
                                                "`params`", updates, params))  # fmt: skip
        try:
            return inner.update(updates, state, params, **extra)
        except (ValueError, TypeError) as err:
            if "tree" not in str(err) and "structure" not in str(err):
                raise
            raise ValueError(
                "`updates` given to `freeze(...).update` do not have the structure of the tree "
                "given to `init`: pass gradients w.r.t. that same combined tree (`jax.grad` of the "
                "loss w.r.t. `jaxlora.combine(frozen, lora)`), with the state `init` made for it"
            ) from err

    return optax.GradientTransformation(inner.init, update)


def _labels(tree: Params, config: LoraConfig) -> Params:
    _check_combined(tree, config, "freeze", factors=False)
    labels = jax.tree.map(lambda flag: TRAINABLE if flag else FROZEN, _mask(tree, config))
    if TRAINABLE not in jax.tree.leaves(labels):
        raise ValueError(
            "`freeze`: the tree given to the optimizer has no trainable leaf (no `lora_a` / "
            f"`lora_b`, no bias per `bias`={config.bias!r}, no `modules_to_save`), so every "
            "update would be zero; pass the combined tree `jaxlora.combine(frozen, lora)`, not "
            "the base params"
        )
    return labels


def _structure_message(head: str, got: Params, want: Params) -> str:
    got_paths = {paths.join(n) for _, n, _ in paths.flatten(got)}
    want_paths = {paths.join(n) for _, n, _ in paths.flatten(want)}
    extra, missing = sorted(got_paths - want_paths), sorted(want_paths - got_paths)
    return (
        f"{head}: extra leaves {paths.preview(extra, 6) or 'none'}; missing leaves "
        f"{paths.preview(missing, 6) or 'none'}. Pass gradients w.r.t. the same combined tree"
    )


def partition(combined: Params, config: LoraConfig) -> tuple[Params, LoraTree]:
    """The inverse of :func:`jaxlora.combine`: ``(frozen, lora)`` from one combined tree.

    ``frozen`` keeps every leaf but the factors; ``lora`` holds the trainable leaves.
    """
    _check_combined(combined, config, "partition")
    frozen: dict[Any, Any] = {}
    lora: LoraTree = {}
    for keys, names, leaf in paths.flatten(combined):
        if _is_trainable(combined, config, keys, names):
            paths.set_in(lora, keys, leaf)
        if names[-1] not in ADAPTER_LEAVES:
            paths.set_in(frozen, keys, leaf)
    adapted = {paths.join(n[:-1]) for _, n, _ in paths.flatten(lora) if n and n[-1] == LORA_A}
    if config.target_modules is not None:
        targets = find_targets(frozen, config, argument="combined", caller="partition")
        untargeted = sorted(adapted - {t.path for t in targets})
        if untargeted:
            raise ValueError(
                f"`combined` (in `partition`) has factors at {paths.preview(untargeted)}, which "
                f"`config` does not target (`target_modules`={config.target_modules!r}); pass "
                "the config the adapter was made with"
            )
    return frozen, lora
