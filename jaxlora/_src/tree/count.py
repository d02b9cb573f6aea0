"""Parameter counts: how much of a model LoRA trains, for concrete or abstract trees."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jaxlora._src import paths
from jaxlora._src.types import ADAPTER_LEAVES, LoraTree, Params


def _size(leaf) -> int:
    return math.prod(getattr(leaf, "shape", ()))


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
        frozen: the base params.
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
    lora = lora or {}
    base_by_module: dict[str, int] = {}
    for _, names, leaf in paths.flatten(frozen):
        module = paths.join(names[:-1])
        base_by_module[module] = base_by_module.get(module, 0) + _size(leaf)
    adapter_by_module: dict[str, int] = {}
    trainable_by_module: dict[str, int] = {}
    for keys, names, leaf in paths.flatten(lora):
        module = paths.join(names[:-1])
        size = _size(leaf)
        trainable_by_module[module] = trainable_by_module.get(module, 0) + size
        if names[-1] in ADAPTER_LEAVES:
            adapter_by_module[module] = adapter_by_module.get(module, 0) + size
        elif not isinstance(paths.get_in(lora, keys), Mapping) and module not in base_by_module:
            raise ValueError(f"`lora` leaf `{paths.join(names)}` has no counterpart in `frozen`")
    rows = tuple(
        ModuleCount(m, base_by_module.get(m, 0), adapter_by_module.get(m, 0), trainable)
        for m, trainable in trainable_by_module.items()
    )
    total = sum(base_by_module.values()) + sum(adapter_by_module.values())
    return ParamCount(total=total, trainable=sum(trainable_by_module.values()), modules=rows)
