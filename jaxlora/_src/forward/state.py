"""State a training step updates besides the adapter: batch statistics, RNG counters, caches.

``jaxlora.apply(..., mutable=True)`` returns ``(output, updates)`` on linen and NNX alike.
``updates`` holds the model's non-parameter variables after the call, never a parameter (the
adapted kernels are rebuilt inside every call; Θ is what the optimiser updates):

* linen: the mutated collections, as ``Module.apply(..., mutable=...)`` returns them
  (``{"batch_stats": ...}``); ``mutable=True`` means every collection but ``params``;
* NNX: an ``nnx.State`` of the selected variables (``nnx.BatchStat``, ``RngCount`` / ``RngKey``
  of the model's own ``nnx.Rngs`` streams, ...), at their paths in ``frozen``; fold it back with
  ``nnx.merge_state(frozen, updates)``, so the next step runs on the new batch statistics and
  its dropout layers draw new masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
from flax.core.scope import DenyList
from flax.nnx import variablelib

PARAMS = "params"


def linen_mutable(mutable: Any) -> Any:
    """The ``mutable`` argument for a linen ``Module.apply``: ``True`` is every collection but
    ``params``; collection names pass through.

    Raises:
        TypeError: for something other than ``True``, a name or a list of names.
        ValueError: when ``params`` is among them (the adapted params are not state).
    """
    if mutable is True:
        return DenyList(PARAMS)
    names = (mutable,) if isinstance(mutable, str) else mutable
    if not (isinstance(names, Sequence) and all(isinstance(n, str) for n in names)):
        raise TypeError(
            "`mutable` on a linen model must be True, a collection name or a list of them "
            f"(e.g. ['batch_stats']), got {mutable!r}"
        )
    if PARAMS in names:
        raise ValueError(
            "`mutable` names the `params` collection: jaxlora rebuilds the params in every call "
            "and trains the adapter Θ instead; ask for the other collections (e.g. "
            "['batch_stats'], or True for all of them)"
        )
    return list(names)


def nnx_mutable(mutable: Any) -> Any:
    """An NNX filter of the variables to return, ``None`` for none (``mutable=False``).

    ``True`` is every variable but the parameters; a linen collection name (``"batch_stats"``)
    is the NNX Variable type of that name (``nnx.BatchStat``), so one call fits both frameworks.

    Example:
        >>> from flax import nnx
        >>> _, state = nnx.split(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
        >>> sorted(nnx.filter_state(state, nnx_mutable(["batch_stats"])))
        ['mean', 'var']
    """
    if mutable is False or mutable is None:
        return None
    if mutable is True:
        return nnx.Not(nnx.Param)
    if isinstance(mutable, str | list | tuple):
        # Linen's collection names ("batch_stats", "cache") name NNX's Variable types; any other
        # string stays an NNX filter (a tag such as an RNG stream's name).
        names = (mutable,) if isinstance(mutable, str) else mutable
        mutable = tuple(_variable_type(n) if isinstance(n, str) else n for n in names)
    try:
        nnx.filterlib.to_predicate(mutable)
    except (TypeError, ValueError) as err:
        raise TypeError(
            "`mutable` on an NNX model must be True or an NNX filter (a Variable type such as "
            f"`nnx.BatchStat`, or a tuple of them), got {mutable!r}"
        ) from err
    return nnx.All(mutable, nnx.Not(nnx.Param))


def check_linen_updates(mutable: Any, updates: Mapping[str, Any], variables: Any) -> None:
    """Raises a ValueError when a collection that ``mutable`` names is not among the ones the
    call returned: the model neither holds it (``variables``) nor made it, so a typo
    (``"batchstats"``) would otherwise come back as an empty dict and the statistics be lost."""
    if mutable is True or mutable is False or mutable is None:
        return
    names = (mutable,) if isinstance(mutable, str) else tuple(mutable)
    missing = [name for name in names if name not in updates]
    if missing:
        existing = sorted({PARAMS, *updates, *(variables or {})})
        raise ValueError(
            f"`mutable` names {missing}, a collection this model neither holds nor creates; the "
            f"collections that exist: {existing} (pass True for every one but `params`)"
        )


def _entries(mutable: Any) -> list[tuple[str, Any]]:
    """Each filter the user gave in ``mutable``, with how to show it."""
    if isinstance(mutable, str | list | tuple):
        names = (mutable,) if isinstance(mutable, str) else mutable
        return [(_label(n), _variable_type(n) if isinstance(n, str) else n) for n in names]
    return [(_label(mutable), mutable)]


def _label(entry: Any) -> str:
    return f"nnx.{entry.__name__}" if isinstance(entry, type) else repr(entry)


def _kinds(module: nnx.Module) -> list[str]:
    """The non-parameter variable types of ``module``, with their linen collection names."""
    kinds = set()
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.Param))):
        kind = type(variable)
        try:
            name = variablelib.variable_name_from_type(kind, allow_register=False)
        except ValueError:  # a type with no collection name (RngCount, a user's own)
            name = None
        kinds.add(f"{name!r} (nnx.{kind.__name__})" if name else f"nnx.{kind.__name__}")
    return sorted(kinds)


def check_nnx_selects(mutable: Any, module: nnx.Module) -> None:
    """Raises a ValueError when an entry of ``mutable`` selects no variable of ``module``
    (after the call, so variables the call creates count): a typo such as ``"batchstats"``
    would otherwise return an empty state and the batch statistics be dropped. ``params``
    (``nnx.Param``) is refused as on linen."""
    if mutable is True or mutable is False or mutable is None:
        return
    flat = nnx.to_flat_state(nnx.state(module))
    for label, entry in _entries(mutable):
        if entry is nnx.Param:
            raise ValueError(
                "`mutable` names the params (`nnx.Param`): jaxlora rebuilds the params in every "
                "call and trains the adapter Θ instead; ask for the other variables (e.g. "
                "'batch_stats', or True for all of them)"
            )
        predicate = nnx.filterlib.to_predicate(nnx.All(entry, nnx.Not(nnx.Param)))
        if not any(predicate(path, variable) for path, variable in flat):
            raise ValueError(
                f"`mutable` entry {label} selects no variable of this model; the non-parameter "
                f"variables that exist: {', '.join(_kinds(module)) or 'none'} (pass True for "
                "all of them)"
            )


def _variable_type(name: str) -> Any:
    try:
        return variablelib.variable_type_from_name(name, allow_register=False)
    except ValueError:
        return name


def updates(module: nnx.Module, which: Any, requested: Any = None) -> nnx.State:
    """The variables of ``module`` that ``which`` selects, as an ``nnx.State`` (never a Param);
    each entry of ``requested`` (the user's ``mutable``) must select one."""
    check_nnx_selects(requested, module)
    return nnx.state(module, which)
