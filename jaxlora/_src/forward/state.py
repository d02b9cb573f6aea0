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

from collections.abc import Sequence
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


def _variable_type(name: str) -> Any:
    try:
        return variablelib.variable_type_from_name(name, allow_register=False)
    except ValueError:
        return name


def updates(module: nnx.Module, which: Any) -> nnx.State:
    """The variables of ``module`` that ``which`` selects, as an ``nnx.State`` (never a Param)."""
    return nnx.state(module, which)
