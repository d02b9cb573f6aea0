"""Checks that an adapter Θ and a config belong together, before anything is folded.

``merge`` and the factored forward take the rank from the factors and alpha from the config, so
an adapter paired with another config would be scaled wrong without a word. These checks run in
:func:`jaxlora._src.tree.core.map_adapted`, which both paths share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import (
    Target,
    find_targets,
    find_trainable_leaves,
    module_paths,
)
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.types import ADAPTER_LEAVES, LORA_A, LoraTree, Params


def check_lora_tree(lora: Any, what: str, name: str = "lora") -> None:
    """Raises a TypeError unless ``lora`` is a nested mapping whose leaves are arrays.

    Python lists or scalars as factors would otherwise fail deep inside an einsum, and ``None``
    would merge to the bare base.
    """
    if not isinstance(lora, Mapping):
        raise TypeError(
            f"`{name}` of `{what}` must be the adapter Θ, a nested dict of arrays (the second "
            f"value of `jaxlora.split`), got {type(lora).__name__}"
        )
    stack: list[tuple[tuple[str, ...], Any]] = [((), lora)]
    while stack:
        keys, node = stack.pop()
        for key, value in node.items():
            where = keys + (str(key),)
            if isinstance(value, Mapping):
                stack.append((where, value))
            elif not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise TypeError(
                    f"`{name}` leaf `{paths.join(where)}` is a {type(value).__name__}, not an "
                    "array; adapter leaves must be arrays (convert with `jnp.asarray`)"
                )
            elif str(key) in ADAPTER_LEAVES and not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(
                    f"`{name}` leaf `{paths.join(where)}` has dtype {value.dtype}; adapter "
                    "factors must be floating (convert with `.astype(jnp.float32)`)"
                )


def require_tree(**trees: Any) -> None:
    """A TypeError naming the first of ``trees`` (argument name -> value) that is no pytree of
    leaves (:func:`jaxlora._src.validate.pytree`)."""
    for name, tree in trees.items():
        validate.pytree(name, tree)


def _abstract(params: Params) -> Params:
    """``params`` with each quantised kernel seen as the float kernel it stands for."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def _describe_rank(config: LoraConfig, path: str) -> str:
    found = paths.first_match(config.rank_pattern, path)
    return f"`rank_pattern[{found[0]!r}]`" if found else f"`r`={config.r}"


def check_adapter_config(params: Params, lora: LoraTree, config: LoraConfig, what: str) -> None:
    """Raises a ValueError when a module adapted in ``lora`` is not a target of ``config`` for
    ``params``, or when its factors' rank differs from the rank ``config`` gives its path.

    Modules of ``lora`` that ``params`` lacks are left to :func:`~core.map_adapted`'s own check.
    """
    adapted = {
        paths.join(names[:-1]): leaf
        for _, names, leaf in paths.flatten(lora)
        if names and names[-1] == LORA_A
    }
    if not adapted:
        if not any(names and names[-1] in ADAPTER_LEAVES for _, names, _ in paths.flatten(lora)):
            _check_no_factors(lora, config, what)
        return  # a module with some adapter leaves but no `lora_a`: fold_module names it
    abstract = _abstract(params)
    present = set(module_paths(abstract))
    if not present & set(adapted):
        return
    found = find_targets(abstract, config, caller=what)
    targets: dict[str, Target] = {t.path: t for t in found}
    untargeted = [p for p in adapted if p in present and p not in targets]
    if untargeted:
        raise ValueError(
            f"`lora` adapts {paths.preview(untargeted)}, which `config` does not target "
            f"(`target_modules`={config.target_modules!r}); `{what}` would fold an update the "
            "config does not describe. Pass the config the adapter was made with"
        )
    for path, a in adapted.items():
        target = targets.get(path)
        rank = int(a.shape[-1]) if getattr(a, "ndim", 0) else None
        if target is not None and rank is not None and rank != target.rank:
            raise ValueError(
                f"`lora` factors at `{path}` have rank {rank} but `config` gives rank "
                f"{target.rank} there ({_describe_rank(config, path)}), so `{what}` would use "
                f"the scale of rank {target.rank}, not the one the adapter was trained with. Pass "
                "the config the adapter was trained with"
            )
    _check_copies(abstract, lora, config, found, what)


def _check_no_factors(lora: LoraTree, config: LoraConfig, what: str) -> None:
    """A ValueError for an adapter without factors when ``config`` targets modules."""
    if config.target_modules is None:
        return
    names = {n[-1] for _, n, _ in paths.flatten(lora) if n}
    hint = (
        " It holds 'kernel' leaves: is it the frozen base (the first value of `split`)?"
        if names & {"kernel", "embedding"}
        else ""
    )
    raise ValueError(
        f"`lora` given to `{what}` holds no `lora_a` / `lora_b` factors, but `config` targets "
        f"modules (`target_modules`={config.target_modules!r}).{hint} Pass the adapter Θ, the "
        "second value of `jaxlora.split(params, config, key)`"
    )


def _check_copies(abstract: Params, lora: LoraTree, config: LoraConfig, targets, what: str) -> None:
    """A ValueError when ``lora`` lacks a leaf ``config`` trains in full (biases, saved modules)."""
    have = {keys for keys, _, _ in paths.flatten(lora)}
    trainable = find_trainable_leaves(abstract, config, targets)
    missing = [path for keys, path in trainable if keys not in have]
    if missing:
        raise ValueError(
            f"`lora` lacks the trainable copies {paths.preview(missing)} that `config` trains in "
            f"full (`bias`={config.bias!r}, `modules_to_save`={config.modules_to_save!r}), so "
            f"`{what}` would use the base values there. Pass the config the adapter was made with"
        )
