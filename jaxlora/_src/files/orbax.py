"""Adapter checkpoints with orbax: Θ, its config as JSON and, optionally, the optimizer state.

Only the adapter is written, never the base: a checkpoint step holds the item ``lora`` (Θ), the
item ``config`` (the :class:`~jaxlora.LoraConfig` as JSON) and, when given, ``opt_state``. Writes
go through ``orbax.checkpoint.CheckpointManager``, which commits each step atomically (a temporary
directory renamed into place), keeps the last N or the best N by a metric, and never pickles.

Restoring needs no template: the stored config and the base params (arrays or
``jax.ShapeDtypeStruct``) determine the shapes Θ must have, and an optimizer determines the
structure of its state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.tree.fit import check_fits, expected_adapter
from jaxlora._src.types import LoraTree, Params

#: Item names inside a checkpoint step.
LORA_ITEM = "lora"
CONFIG_ITEM = "config"
OPT_STATE_ITEM = "opt_state"


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`restore` returns: the adapter, its config, the optimizer state and the step."""

    lora: LoraTree
    config: LoraConfig
    opt_state: Any
    step: int


def checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = None,
    best_metric: str | None = None,
    best_mode: str = "min",
    async_save: bool = False,
    **options: Any,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` for adapter checkpoints.

    Args:
        directory: where the steps live (created if missing).
        max_to_keep: keep at most this many steps (``None`` keeps all).
        best_metric: with it, the steps kept are the best by ``metrics[best_metric]`` as passed to
            :func:`save`, instead of the latest.
        best_mode: ``"min"`` (e.g. a loss) or ``"max"`` (e.g. an accuracy).
        async_save: write in a background thread; call ``manager.wait_until_finished()`` before
            reading what was written.
        **options: any other ``orbax.checkpoint.CheckpointManagerOptions`` field.

    Returns:
        The manager; close it (or use it as a context manager) when done.

    Raises:
        ValueError: when ``best_mode`` is neither ``"min"`` nor ``"max"``.
    """
    if best_mode not in ("min", "max"):
        raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
    best_fn = None if best_metric is None else (lambda metrics: float(metrics[best_metric]))
    manager_options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=best_fn,
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        **options,
    )
    handlers = {
        LORA_ITEM: ocp.StandardCheckpointHandler(),
        CONFIG_ITEM: ocp.JsonCheckpointHandler(),
        OPT_STATE_ITEM: ocp.StandardCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.fspath(directory), item_handlers=handlers, options=manager_options
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    lora: LoraTree,
    config: LoraConfig,
    *,
    opt_state: Any = None,
    metrics: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Writes Θ, ``config`` and optionally ``opt_state`` as checkpoint ``step``.

    Args:
        manager: from :func:`checkpoint_manager` (or any orbax ``CheckpointManager``).
        step: the training step; steps are directories under the manager's directory.
        lora: the adapter Θ.
        config: the config Θ was made with; stored as JSON beside it.
        opt_state: optimizer state to store too (restore it with ``optimizer=`` in
            :func:`restore`).
        metrics: scalars for best-N retention (see ``best_metric``).
        force: save even where the manager's save interval says not to.

    Returns:
        Whether a checkpoint was started (orbax skips steps outside its save interval).

    Raises:
        TypeError: when ``config`` is not a ``LoraConfig`` or ``lora`` not a dict.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora import checkpoint
        >>> params = {"dense": {"kernel": jnp.ones((4, 4))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["dense"])
        >>> _, lora = jaxlora.split(params, config, jax.random.key(0))
        >>> with checkpoint.checkpoint_manager(tempfile.mkdtemp()) as manager:
        ...     _ = checkpoint.save(manager, 10, lora, config)
        ...     restored = checkpoint.restore(manager, params)
        >>> restored.step, restored.config == config
        (10, True)
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")
    if not isinstance(lora, Mapping):
        raise TypeError(f"`lora` must be the adapter dict from jaxlora.split, got {type(lora)}")
    items = {
        LORA_ITEM: ocp.args.StandardSave(lora),
        CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
    }
    if opt_state is not None:
        items[OPT_STATE_ITEM] = ocp.args.StandardSave(opt_state)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def _stored_tree(metadata: Any) -> Any:
    # Orbax wraps the tree of ArrayMetadata in a TreeMetadata object (``.tree``) in recent versions.
    return getattr(metadata, "tree", metadata)


def restore(
    manager: ocp.CheckpointManager,
    frozen: Params,
    *,
    step: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> Restored:
    """Reads an adapter checkpoint back, with no template: shapes come from the stored config
    applied to ``frozen``.

    Args:
        manager: the manager the checkpoint was saved with (or a new one on the same directory).
        frozen: the base params (arrays or ``jax.ShapeDtypeStruct``) the adapter belongs to.
        step: which step; the latest by default (``manager.best_step()`` for the best).
        optimizer: when given, the stored optimizer state is restored into the structure
            ``optimizer.init(lora)`` has; otherwise ``opt_state`` is ``None``.

    Returns:
        A :class:`Restored` with ``lora``, ``config``, ``opt_state`` and ``step``.

    Raises:
        ValueError: when there is no checkpoint; when Θ as stored does not fit what the stored
            config makes for ``frozen`` (the message names every path with both shapes); when
            ``optimizer`` is given but the step holds no optimizer state.
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"no adapter checkpoint in `{manager.directory}`")
    elif step not in manager.all_steps():
        steps = list(manager.all_steps())
        raise ValueError(f"`step`={step} is not in `{manager.directory}`; steps there: {steps}")
    stored_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = LoraConfig.from_dict(stored_json[CONFIG_ITEM])
    where = f"the adapter checkpoint at step {step} in `{manager.directory}`"
    try:
        expected = expected_adapter(frozen, config)
    except ValueError as err:
        raise ValueError(f"the stored config of {where} does not fit `frozen`: {err}") from None
    metadata = manager.item_metadata(step)
    if metadata.get(LORA_ITEM) is None:
        raise ValueError(
            f"`manager` cannot read the `{LORA_ITEM}` item of {where}: open the directory with "
            "`jaxlora.checkpoint.checkpoint_manager`, which registers the item handlers"
        )
    check_fits(paths.by_path(_stored_tree(metadata[LORA_ITEM])), paths.by_path(expected), where)
    items = {LORA_ITEM: ocp.args.StandardRestore(expected)}
    if optimizer is not None:
        if metadata.get(OPT_STATE_ITEM) is None:
            raise ValueError(
                f"`optimizer` was given but {where} holds no optimizer state; save it with "
                "`save(..., opt_state=...)`"
            )
        items[OPT_STATE_ITEM] = ocp.args.StandardRestore(jax.eval_shape(optimizer.init, expected))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    opt_state = restored[OPT_STATE_ITEM] if optimizer is not None else None
    return Restored(lora=restored[LORA_ITEM], config=config, opt_state=opt_state, step=step)
