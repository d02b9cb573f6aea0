"""Parameter counts: how much of a model LoRA trains, for concrete or abstract trees."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora._src import paths
from jaxlora._src.config.conventions import WEIGHT_LEAVES
from jaxlora._src.quant.kernel import is_quantized
from jaxlora._src.tree import checks
from jaxlora._src.types import ADAPTER_LEAVES, LORA_A, LORA_B, LoraTree, Params


def _size(leaf) -> int:
    return math.prod(leaf.shape)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def params_only(tree: Params) -> Params:
    """``tree`` without the NNX variables that are not parameters (``nnx.BatchStat``, ``RngKey``,
    ``RngCount``, caches, ...): what a full ``nnx.State`` from ``nnx.split(model)`` holds that LoRA
    neither counts nor adapts nor trains. ``nnx.Param`` and its subclasses stay, at their paths;
    a tree without NNX variables (a linen ``params`` dict) is returned as it is. Of a tree that
    holds an Equinox module, only the array leaves: its functions, activation choices and Python
    numbers (a dropout rate) are no parameters (``None`` in their place, as ``eqx.partition``).

    Example:
        >>> from flax import nnx
        >>> _, state = nnx.split(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
        >>> sorted(params_only(state))
        ['bias', 'scale']
    """
    tree = _equinox_arrays(tree)
    leaves = jax.tree.leaves(tree, is_leaf=_is_variable)
    if not any(_is_variable(x) and not isinstance(x, nnx.Param) for x in leaves):
        return tree
    if isinstance(tree, nnx.State):
        return nnx.filter_state(tree, nnx.Param)

    def keep(x):
        return None if _is_variable(x) and not isinstance(x, nnx.Param) else x

    return jax.tree.map(keep, tree, is_leaf=_is_variable)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct) or is_quantized(x)


def _equinox_arrays(tree: Params) -> Params:
    """``tree`` with ``None`` for every non-array leaf when it holds an Equinox module."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return tree
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    if not any(isinstance(x, eqx.Module) for x in nodes):
        return tree
    return jax.tree.map(lambda x: x if _is_array(x) else None, tree, is_leaf=is_quantized)


def base_leaves(frozen: Params) -> dict[tuple[str, ...], Any]:
    """``{string path: leaf}`` of ``frozen``, a quantised kernel as one leaf of its float shape;
    of an ``nnx.State``, its parameters only (:func:`params_only`).

    Raises:
        TypeError: for a leaf that is not an array (a string, an object): it is no parameter.
    """
    flat = jax.tree_util.tree_flatten_with_path(params_only(frozen), is_leaf=is_quantized)[0]
    out = {}
    for keypath, leaf in flat:
        names = paths.leaf_path(keypath)
        if isinstance(leaf, int | float) and not isinstance(leaf, bool):
            leaf = jax.ShapeDtypeStruct((), type(leaf))
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(
                f"`frozen` leaf `{paths.join(names)}` is a {type(leaf).__name__}, not an array: "
                "`count` takes a params tree of arrays or `jax.ShapeDtypeStruct`s (pass the "
                "model's `params` collection, without non-array metadata)"
            )
        out[names] = leaf
    return out


def _check_factors_fit(base: dict, lora: LoraTree, keys: tuple[Any, ...], names) -> None:
    """A ValueError unless ``frozen`` holds a weight at the module that the factors fit.

    ``keys`` are the raw keys of the ``lora_a`` leaf (ints stay ints, so a dict keyed by layer
    number or a list of layers finds its factors), ``names`` their string forms.
    """
    module = paths.join(names[:-1])
    weight = next(
        (base[names[:-1] + (leaf,)] for leaf in WEIGHT_LEAVES if names[:-1] + (leaf,) in base),
        None,
    )
    factors = paths.get_in(lora, tuple(keys[:-1]))
    a, b = factors.get(LORA_A), factors.get(LORA_B)
    fits = False
    if weight is not None and b is not None:
        n_stack = a.ndim + b.ndim - 2 - len(weight.shape)
        stack = math.prod(b.shape[:n_stack]) if n_stack >= 0 else 0
        r = a.shape[-1]
        fits = (
            n_stack >= 0
            and b.shape[n_stack] == r
            and _size(a) * _size(b) == (_size(weight) * r * r * stack)
        )
    if not fits:
        have = "no kernel or embedding" if weight is None else f"a {tuple(weight.shape)} weight"
        raise ValueError(
            f"`lora` factors at `{module}` do not fit `frozen`, which has {have} there; was the "
            "adapter made for another model (or another size of it)?"
        )


def check_fits(base: dict, lora: LoraTree, what: str) -> None:
    """Checks, without a config, that ``lora`` fits the base (``base``: :func:`_base_leaves` of
    ``frozen``): its factors fit a weight of ``frozen`` and each other leaf replaces a leaf of
    ``frozen`` of the same shape. ``frozen`` itself passed as ``lora`` is an error.
    """
    checks.check_lora_tree(lora, what)
    flat = list(paths.flatten(lora))
    if flat and not any(n[-1] in ADAPTER_LEAVES for _, n, _ in flat) and len(flat) == len(base):
        raise ValueError(
            f"`lora` given to `{what}` holds every leaf of `frozen` ('kernel' included) and no "
            "`lora_a` / `lora_b` factors: it looks like the frozen base itself. Pass the adapter "
            "Θ, the second value of `jaxlora.split(params, config, key)`"
        )
    for keys, names, leaf in flat:
        if names[-1] == LORA_A:
            _check_factors_fit(base, lora, keys, names)
        elif names[-1] in ADAPTER_LEAVES:
            continue
        elif names not in base or tuple(base[names].shape) != tuple(leaf.shape):
            found = f"of shape {tuple(base[names].shape)}" if names in base else "no such leaf"
            raise ValueError(
                f"`lora` leaf `{paths.join(names)}` has no counterpart in `frozen` (it is "
                f"{tuple(leaf.shape)}, `frozen` has {found}); was the adapter made for another "
                f"model? (in `{what}`)"
            )


@dataclasses.dataclass(frozen=True)
class ModuleCount:
    """One row of the per-module table: a module's base size and what Θ holds for it."""

    path: str
    base: int
    adapter: int
    trainable: int


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Totals and the per-module table returned by :func:`count`.

    ``total`` counts the model as it runs: every base leaf plus the LoRA factors. Trainable copies
    of base leaves (biases, ``modules_to_save``) replace their base leaf and are counted once.
    """

    total: int
    trainable: int
    modules: tuple[ModuleCount, ...]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line, like PEFT's ``print_trainable_parameters``."""
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )

    def table(self) -> str:
        """The per-module table, one line per module that Θ touches."""
        width = max([len("module")] + [len(m.path) for m in self.modules])
        lines = [f"{'module':<{width}}  {'base':>14}  {'trainable':>12}"]
        lines += [f"{m.path:<{width}}  {m.base:>14,}  {m.trainable:>12,}" for m in self.modules]
        return "\n".join(lines + [self.summary()])

    def __str__(self) -> str:
        return self.summary()


def count(frozen: Params, lora: LoraTree | None = None) -> ParamCount:
    """Counts total and trainable parameters; leaves may be arrays or ``ShapeDtypeStruct``.

    Args:
        frozen: the base params: a linen ``params`` dict, or a full ``nnx.State`` from
            ``nnx.split(model)``, of which only the parameters (``nnx.Param`` and subclasses)
            count; batch statistics, RNG state and other variables do not.
        lora: the adapter Θ from :func:`jaxlora.split` (``None`` counts the base alone).

    Returns:
        A :class:`ParamCount`; ``str()`` of it is the one-line summary, ``.table()`` adds the
        per-module rows.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"q": {"kernel": jnp.ones((100, 100))}, "v": {"kernel": jnp.ones((100, 100))}}
        >>> config = jaxlora.LoraConfig(r=4, target_modules=["q"])
        >>> print(jaxlora.count(*jaxlora.split(params, config, jax.random.key(0))))
        trainable params: 800 || all params: 20,800 || trainable%: 3.8462
    """
    base = base_leaves(frozen)
    base_by_module: dict[str, int] = {}
    for names, leaf in base.items():
        module = paths.join(names[:-1])
        base_by_module[module] = base_by_module.get(module, 0) + _size(leaf)
    if lora is not None:
        check_fits(base, lora, "count")
    adapter_by_module: dict[str, int] = {}
    trainable_by_module: dict[str, int] = {}
    for _, names, leaf in paths.flatten(lora or {}):
        module = paths.join(names[:-1])
        size = _size(leaf)
        trainable_by_module[module] = trainable_by_module.get(module, 0) + size
        if names[-1] in ADAPTER_LEAVES:
            adapter_by_module[module] = adapter_by_module.get(module, 0) + size
    rows = tuple(
        ModuleCount(m, base_by_module.get(m, 0), adapter_by_module.get(m, 0), trainable)
        for m, trainable in trainable_by_module.items()
    )
    total = sum(base_by_module.values()) + sum(adapter_by_module.values())
    return ParamCount(total=total, trainable=sum(trainable_by_module.values()), modules=rows)
