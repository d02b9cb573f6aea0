"""Adapter checkpoints with orbax: Θ, its config as JSON and, optionally, the optimizer state.

Only the adapter is written, never the base: a checkpoint step holds the item ``lora`` (Θ), the
item ``config`` (the :class:`~jaxlora.LoraConfig` as JSON) and, when given, ``opt_state``. Writes
go through ``orbax.checkpoint.CheckpointManager``, which commits each step atomically (a temporary
directory renamed into place), keeps the last N or the best N by a metric, and never pickles. The
item ``checksums`` holds the sha256 of every array and of the config; :func:`restore` verifies
them. A step is never overwritten: saving an existing or older step than the directory holds
when the save starts is an error, and one manager at a time saves into a directory (the others are
refused while it does; :mod:`~jaxlora._src.files.directory_lock`), so two managers cannot replace
each other's steps.

Restoring needs no template: the stored config and the base params (arrays or
``jax.ShapeDtypeStruct``) determine the shapes Θ must have, and an optimizer determines the
structure of its state.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.files import checksum
from jaxlora._src.files.orbax_checks import (
    check_adapter_matches,
    check_manager,
    check_metrics,
    check_new_step,
    check_optimizer,
    check_step,
)
from jaxlora._src.files.orbax_manager import (
    CHECKSUMS_ITEM,
    CONFIG_ITEM,
    LORA_ITEM,
    OPT_STATE_ITEM,
    AdapterCheckpointManager,
)
from jaxlora._src.tree.checks import require_tree
from jaxlora._src.tree.fit import check_fits, expected_adapter
from jaxlora._src.types import LoraTree, Params


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`restore` returns: the adapter, its config, the optimizer state and the step."""

    lora: LoraTree
    config: LoraConfig
    opt_state: Any
    step: int


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

    The step is committed atomically (a temporary directory renamed into place) together with the
    sha256 of every array and of the config, which :func:`restore` verifies.

    Args:
        manager: from :func:`checkpoint_manager` (or any orbax ``CheckpointManager``).
        step: the training step, newer than every step in the directory as read at save time
            (steps another manager wrote count); steps are directories under the manager's
            directory.
        lora: the adapter Θ.
        config: the config Θ was made with; stored as JSON beside it.
        opt_state: optimizer state to store too (restore it with ``optimizer=`` in
            :func:`restore`).
        metrics: scalars for best-N retention; required, with the ``best_metric`` key, when the
            manager has a ``best_metric``.
        force: save even where the manager's save interval (``save_interval_steps``) says not to.

    Returns:
        Whether a checkpoint was started: False only when the save interval skips ``step``.

    Raises:
        TypeError: when ``manager`` is no ``CheckpointManager``, ``config`` not a
            ``LoraConfig``, ``lora`` not a dict, ``step`` not an int >= 0 or a metric no number.
        ValueError: when ``step`` already exists or is older than the latest step (nothing is
            overwritten), the manager is closed, another manager is saving into the directory
            right now (one writer at a time; see :func:`checkpoint_manager`), ``metrics`` lacks
            the manager's ``best_metric``, or ``lora`` adapts a module ``config`` does not target
            or at another rank than ``config`` gives it.

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
    check_manager(manager)
    if isinstance(manager, AdapterCheckpointManager):
        manager.check_open("`save`")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jaxlora.LoraConfig, got {type(config).__name__}")
    if not isinstance(lora, Mapping):
        raise TypeError(f"`lora` must be the adapter dict from jaxlora.split, got {type(lora)}")
    check_step(step)
    if not isinstance(force, bool):
        raise TypeError(f"`force` must be True or False, got {force!r:.60}")
    if not isinstance(manager, AdapterCheckpointManager):  # which checks under its lock instead
        manager.wait_until_finished()
        manager.reload()
        check_new_step(manager, step)
    metrics = check_metrics(manager, metrics)
    check_adapter_matches(lora, config)
    document = config.to_dict()
    digests = {CONFIG_ITEM: checksum.json_digest(document), LORA_ITEM: checksum.tree_digests(lora)}
    items = {LORA_ITEM: ocp.args.StandardSave(lora), CONFIG_ITEM: ocp.args.JsonSave(document)}
    if opt_state is not None:
        items[OPT_STATE_ITEM] = ocp.args.StandardSave(opt_state)
        digests[OPT_STATE_ITEM] = checksum.tree_digests(opt_state)
    items[CHECKSUMS_ITEM] = ocp.args.JsonSave(digests)
    os.makedirs(manager.directory, exist_ok=True)
    started = manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if started and isinstance(manager, AdapterCheckpointManager):
        manager.pending_step = step
    return started


def _stored_tree(metadata: Any) -> Any:
    # Orbax wraps the tree of ArrayMetadata in a TreeMetadata object (``.tree``) in recent versions.
    return getattr(metadata, "tree", metadata)


def _item_path(manager: ocp.CheckpointManager, step: int, item: str) -> str:
    directory = os.fspath(manager.directory)
    names = [n for n in os.listdir(directory) if n == str(step) or n.endswith(f"_{step}")]
    return os.path.join(directory, names[0] if names else str(step), item)


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    directory = os.fspath(manager.directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory `{directory}`: it does not exist")
    manager.wait_until_finished()
    manager.reload()  # the steps on disk, with those another manager wrote since this one opened
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"no adapter checkpoint in `{directory}`")
    elif step not in manager.all_steps():
        steps = list(manager.all_steps())
        raise ValueError(f"`step`={step} is not in `{directory}`; steps there: {steps}")
    return step


def _read(manager: ocp.CheckpointManager, step: int, items: dict[str, Any] | None) -> Any:
    """``manager.restore`` of ``items`` (their metadata for None); an unreadable file is a
    ValueError naming its item."""
    try:
        if items is None:
            return manager.item_metadata(step)
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # noqa: BLE001 - tensorstore and orbax raise bare `Exception` too
        names = [LORA_ITEM, OPT_STATE_ITEM] if items is None else list(items)
        where = ", ".join(f"`{_item_path(manager, step, item)}`" for item in names)
        raise ValueError(
            f"cannot read the checkpoint files at step {step} in {where} (damaged or truncated?): "
            f"{type(err).__name__}: {err}"
        ) from err


def _read_config(manager: ocp.CheckpointManager, step: int) -> tuple[LoraConfig, dict | None]:
    """The stored config, checked against its stored sha256, and the stored digests."""
    items = {CONFIG_ITEM: ocp.args.JsonRestore()}
    if os.path.isdir(_item_path(manager, step, CHECKSUMS_ITEM)):
        items[CHECKSUMS_ITEM] = ocp.args.JsonRestore()
    stored = _read(manager, step, items)
    digests = stored[CHECKSUMS_ITEM] if CHECKSUMS_ITEM in items else None
    if digests is None:
        warnings.warn(
            f"step {step} in `{manager.directory}` has no checksums (written before jaxlora "
            "stored them): restored unverified",
            stacklevel=3,
        )
    elif checksum.json_digest(stored[CONFIG_ITEM]) != digests.get(CONFIG_ITEM):
        raise ValueError(
            f"the config `{_item_path(manager, step, CONFIG_ITEM)}` at step {step} is corrupt: its "
            "sha256 differs from the one stored when it was written (edited or damaged)"
        )
    return LoraConfig.from_dict(stored[CONFIG_ITEM]), digests


def _optimizer_template(metadata: Any, optimizer: Any, expected: LoraTree, where: str) -> Any:
    if metadata.get(OPT_STATE_ITEM) is None:
        raise ValueError(
            f"`optimizer` was given but {where} holds no optimizer state; save it with "
            "`save(..., opt_state=...)`"
        )
    template = jax.eval_shape(optimizer.init, expected)
    stored = paths.by_path(_stored_tree(metadata[OPT_STATE_ITEM]))
    wanted = paths.by_path(template)
    if set(stored) != set(wanted):
        raise ValueError(
            f"the optimizer state stored in {where} does not match `optimizer`: stored but not "
            f"in `optimizer.init(lora)`: {paths.preview(sorted(set(stored) - set(wanted)), 8)}; "
            f"in `optimizer.init(lora)` but not stored: "
            f"{paths.preview(sorted(set(wanted) - set(stored)), 8)}. Was it saved with another "
            "optimizer (or other optimizer settings)?"
        )
    return template


def restore(
    manager: ocp.CheckpointManager,
    frozen: Params,
    *,
    step: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> Restored:
    """Reads an adapter checkpoint back, with no template: shapes come from the stored config
    applied to ``frozen``; every array and the config are checked against their stored sha256.

    Args:
        manager: the manager the checkpoint was saved with (or a new one on the same directory).
        frozen: the base params (arrays or ``jax.ShapeDtypeStruct``) the adapter belongs to.
        step: which step; the latest by default (``manager.best_step()`` for the best).
        optimizer: when given, the stored optimizer state is restored into the structure
            ``optimizer.init(lora)`` has; otherwise ``opt_state`` is ``None``.

    Returns:
        A :class:`Restored` with ``lora``, ``config``, ``opt_state`` and ``step``.

    Raises:
        FileNotFoundError: when the manager's directory does not exist (nothing is created).
        ValueError: when the manager is closed; when there is no checkpoint; when Θ as stored
            does not fit what the stored config makes for ``frozen`` (the message names every
            path with both shapes); when ``optimizer`` is given but the step holds no optimizer
            state or the state of another optimizer; when a file cannot be read or an array or
            the config is not what was written (names the file or leaf).
    """
    check_manager(manager)
    if isinstance(manager, AdapterCheckpointManager):
        manager.check_open("`restore`")
    check_optimizer(optimizer)
    require_tree(frozen=frozen)
    step = _resolve_step(manager, step)
    where = f"the adapter checkpoint at step {step} in `{manager.directory}`"
    config, digests = _read_config(manager, step)
    metadata = _read(manager, step, None)
    try:
        expected = expected_adapter(frozen, config)
    except ValueError as err:
        raise ValueError(f"the stored config of {where} does not fit `frozen`: {err}") from None
    if metadata.get(LORA_ITEM) is None:
        raise ValueError(
            f"`manager` cannot read the `{LORA_ITEM}` item of {where}: open the directory with "
            "`jaxlora.checkpoint.checkpoint_manager`, which registers the item handlers"
        )
    check_fits(paths.by_path(_stored_tree(metadata[LORA_ITEM])), paths.by_path(expected), where)
    items = {LORA_ITEM: ocp.args.StandardRestore(expected)}
    if optimizer is not None:
        template = _optimizer_template(metadata, optimizer, expected, where)
        items[OPT_STATE_ITEM] = ocp.args.StandardRestore(template)
    restored = _read(manager, step, items)
    for item in items:
        if digests is not None and item in digests:
            file = f"`{_item_path(manager, step, item)}` ({where})"
            checksum.check_tree(restored[item], digests[item], f"the `{item}` item {file}")
    opt_state = restored[OPT_STATE_ITEM] if optimizer is not None else None
    return Restored(lora=restored[LORA_ITEM], config=config, opt_state=opt_state, step=step)
