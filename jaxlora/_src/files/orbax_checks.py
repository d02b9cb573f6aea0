"""Argument checks of :func:`jaxlora.checkpoint.save` / :func:`~jaxlora.checkpoint.restore` /
:func:`~jaxlora.checkpoint.checkpoint_manager`: each wrong value is named where it enters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.peft_rules import ALL_LINEAR
from jaxlora._src.types import LORA_A, LoraTree


def check_manager_options(directory: Any, best_metric: Any, async_save: Any) -> None:
    """TypeErrors / ValueErrors naming ``directory``, ``best_metric`` or ``async_save``."""
    validate.path("directory", directory)
    if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
        raise TypeError(
            "`best_metric` must be None or the name of a metric passed to `save` (e.g. 'loss'), "
            f"got {best_metric!r}"
        )
    if not isinstance(async_save, bool):
        raise TypeError(f"`async_save` must be True or False, got {async_save!r}")


def check_manager(manager: Any) -> None:
    """A TypeError unless ``manager`` is an orbax ``CheckpointManager``."""
    if not isinstance(manager, ocp.CheckpointManager):
        raise TypeError(
            "`manager` must be a checkpoint manager from `jaxlora.checkpoint.checkpoint_manager("
            f"directory)`, got {type(manager).__name__}"
        )


def check_optimizer(optimizer: Any) -> None:
    """A TypeError unless ``optimizer`` is None or an optax ``GradientTransformation``."""
    if optimizer is not None and not callable(getattr(optimizer, "init", None)):
        raise TypeError(
            "`optimizer` must be an optax GradientTransformation (e.g. `optax.adam(1e-3)`, the "
            f"one the state was made with) or None, got {optimizer!r:.60}"
        )


def check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"`step` must be an int >= 0, got {step!r}")


def check_new_step(manager: ocp.CheckpointManager, step: int) -> None:
    """A ValueError when ``step`` is in ``manager.all_steps()`` or older than the latest of them;
    the caller reloads the steps from disk first (``manager.reload()``), so that what another
    manager wrote counts."""
    steps = list(manager.all_steps())
    if step in steps:
        raise ValueError(
            f"step {step} already exists in `{manager.directory}`; a checkpoint is never "
            f"overwritten: save under a new step, or `manager.delete({step})` first"
        )
    if steps and step < max(steps):
        raise ValueError(
            f"`step`={step} is older than the latest step {max(steps)} in `{manager.directory}`; "
            "steps must increase (restoring goes to the latest)"
        )


def check_metrics(manager: ocp.CheckpointManager, metrics: Any) -> dict[str, float] | None:
    """``metrics`` as ``{name: float}``; errors name ``metrics`` and the key at fault."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(
            f"`metrics` must be a dict of scalars such as {{'loss': 0.5}}, got {metrics!r:.60}"
        )
    best_metric = getattr(manager, "best_metric", None)
    if best_metric is not None and (metrics is None or best_metric not in metrics):
        given = "no `metrics`" if metrics is None else f"`metrics` keys {sorted(metrics)}"
        raise ValueError(
            f"the manager keeps the best steps by `best_metric`={best_metric!r}, but `save` got "
            f"{given}; pass `metrics={{{best_metric!r}: value}}`"
        )
    if metrics is None:
        return None
    out = {}
    for key, value in metrics.items():
        number = getattr(value, "shape", None) == () or isinstance(value, int | float)
        if isinstance(value, bool) or not number:
            raise TypeError(f"`metrics[{key!r}]` must be a number, got {value!r:.40}")
        if not jnp.issubdtype(jnp.result_type(value), jnp.number):
            raise TypeError(f"`metrics[{key!r}]` must be a number, got {value!r:.40}")
        out[key] = float(value)
    return out


def check_adapter_matches(lora: LoraTree, config: LoraConfig) -> None:
    """A ValueError when a module of ``lora`` is not targeted by ``config`` or its factors' rank
    is not the rank ``config`` gives its path (a checkpoint saved so could not be restored)."""
    spec = config.target_modules
    for _, names, a in paths.flatten(lora):
        if not names or names[-1] != LORA_A:
            continue
        path = paths.join(names[:-1])
        if spec is not None and spec != ALL_LINEAR and not paths.match_targets(spec, path):
            raise ValueError(
                f"`lora` adapts `{path}`, which `config` does not target (`target_modules`="
                f"{spec!r}); pass the config the adapter was made with"
            )
        rank = int(a.shape[-1]) if getattr(a, "ndim", 0) else None
        if rank is not None and rank != config.rank_for(path):
            raise ValueError(
                f"`lora` factors at `{path}` have rank {rank} but `config` gives rank "
                f"{config.rank_for(path)} there; pass the config the adapter was made with"
            )
