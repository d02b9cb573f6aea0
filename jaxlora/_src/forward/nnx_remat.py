"""Gradient checkpointing of chosen NNX submodules, picked by path, without editing the model.

The NNX counterpart of :func:`jaxlora.remat.checkpointed`: within :func:`checkpointed`, each
submodule of the given module whose path (``nnx.iter_modules``, ``/``-joined: ``"blocks/0"``)
matches is run through :func:`jaxlora.remat.recompute`, which keeps only its inputs and runs it
again in the backward pass. Like the linen one it works without ``optimization_barrier`` (which
XLA:CPU drops, so ``nnx.remat`` / ``jax.checkpoint`` save nothing there) and re-runs the LoRA
term of the hooked layers inside the block.

A selected call is run on ``nnx.split`` of the module: its state goes in as inputs of the
recomputed function and its non-parameter variables come out (batch statistics, the counters of
its own RNG streams) and are written back to the module, so a block with ``nnx.BatchNorm`` or
``nnx.Dropout`` keeps updating them; the backward pass replays the same draws.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from flax import nnx

from jaxlora._src import paths, validate
from jaxlora._src.forward import remat as remat_lib

_LOCK = threading.Lock()


def _spec(modules: str | Sequence[str]) -> str | tuple[str, ...]:
    if isinstance(modules, str):
        return modules
    if isinstance(modules, Sequence) and modules and all(isinstance(m, str) for m in modules):
        return tuple(modules)
    raise TypeError(
        "`remat` must be a regular expression (str) or a non-empty list of module names (the "
        "`modules` of `checkpointed`), "
        f"got {modules!r}"
    )


def _selected(root: nnx.Module, modules: str | Sequence[str]) -> dict[int, nnx.Module]:
    """The submodules of ``root`` whose path matches ``modules``, by identity (for this call)."""
    spec = _spec(modules)
    seen, chosen = [], {}
    for path, module in nnx.iter_modules(root):
        where = paths.join(str(p) for p in path)
        if not where:
            continue
        seen.append(where)
        if paths.match_targets(spec, where):
            chosen[id(module)] = module
    if not chosen:
        shown = f'"{modules}"' if isinstance(modules, str) else repr(list(modules))
        raise ValueError(
            f"`remat={shown}` matched no submodule of the NNX model; module paths: "
            f"{paths.preview(seen)}"
        )
    return chosen


def _recomputed_call(original: Callable[..., Any], module: nnx.Module, args, kwargs) -> Any:
    """``original(module, *args, **kwargs)`` through :func:`remat_lib.recompute`, with the
    module's non-parameter variables written back afterwards."""
    graphdef, state = nnx.split(module)
    everything, treedef = jax.tree.flatten((args, kwargs))
    traced = [isinstance(x, jax.Array) for x in everything]
    inputs = [x for x, t in zip(everything, traced, strict=True) if t]
    state_leaves, state_def = jax.tree.flatten(state)

    def call(*flat):
        given = iter(flat[: len(inputs)])
        full = [next(given) if t else x for x, t in zip(everything, traced, strict=True)]
        inner_args, inner_kwargs = jax.tree.unflatten(treedef, full)
        inner = nnx.merge(graphdef, jax.tree.unflatten(state_def, flat[len(inputs) :]))
        out = original(inner, *inner_args, **inner_kwargs)
        return out, nnx.state(inner, nnx.Not(nnx.Param))

    converted, consts = remat_lib.hoisting_convert(call, inputs + state_leaves)
    run = remat_lib.recompute(converted, num_tied=len(inputs))
    out, written = run(*inputs, *state_leaves, *consts)
    nnx.update(module, written)
    return out


def _hook(cls: type, chosen: dict[int, nnx.Module], calls: list[int]) -> Callable[..., Any]:
    original = cls.__call__

    def call(self, *args, **kwargs):
        if chosen.get(id(self)) is not self:
            return original(self, *args, **kwargs)
        calls[0] += 1
        return _recomputed_call(original, self, args, kwargs)

    return call


@contextlib.contextmanager
def checkpointed(root: nnx.Module, modules: str | Sequence[str]) -> Iterator[None]:
    """Within the block, the submodules of ``root`` matching ``modules`` are recomputed in the
    backward pass instead of keeping their activations.

    The ``__call__`` of each selected module's class is wrapped for the block's duration (a call
    of any other instance passes straight through); blocks are not re-entrant across threads.

    Raises:
        ValueError: when no submodule matches (the message lists the module paths), or, on
            leaving the block, when no matched module was called.
        TypeError: for a ``modules`` that is neither a string nor a list of strings.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.tanh,
        ...                        nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
        >>> graphdef, state = nnx.split(model)
        >>> def loss(state, remat):
        ...     module = nnx.merge(graphdef, state)
        ...     if not remat:
        ...         return jnp.sum(module(jnp.ones((2, 4))))
        ...     with checkpointed(module, r"layers/\\d"):
        ...         return jnp.sum(module(jnp.ones((2, 4))))
        >>> a, b = jax.grad(loss)(state, True), jax.grad(loss)(state, False)
        >>> all(jnp.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        True
    """
    if not isinstance(root, nnx.Module):
        raise validate.fail_type("root", "the NNX model (an nnx.Module)", root)
    chosen = _selected(root, modules)
    classes = list(dict.fromkeys(type(m) for m in chosen.values()))
    calls = [0]
    with _LOCK:
        saved = [(cls, cls.__dict__.get("__call__")) for cls in classes]
        for cls in classes:
            cls.__call__ = _hook(cls, chosen, calls)
    try:
        yield
    finally:
        with _LOCK:
            for cls, own in reversed(saved):
                if own is None:
                    del cls.__call__
                else:
                    cls.__call__ = own
    if not calls[0]:
        raise ValueError(
            f"`remat={modules!r}` matched NNX modules that were never called as themselves "
            "(a stack run by `nnx.scan` / `nnx.vmap` is called one slice at a time, as a new "
            "module); select modules the model calls directly, or wrap the scanned body in "
            "`nnx.remat`"
        )
