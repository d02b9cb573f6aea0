"""Gradient checkpointing of chosen linen submodules, picked by path, without editing the model.

:func:`checkpointed` recomputes each selected module (a decoder block, say) in the backward pass
instead of keeping its activations: training keeps one block's activations at a time, plus each
block's input. It is what ``flax.linen.remat`` does, with two differences:

* modules are chosen by path (``r"layers_\\d+"``), with the rules of ``target_modules``, so a model
  needs no change, and it composes with :func:`jaxlora.lora_interceptor` and the quantised-base
  interceptor: the recomputation re-runs the LoRA term and the dequantisation too;
* it does not rely on ``optimization_barrier``. ``jax.checkpoint`` uses that barrier to stop XLA
  from merging the recomputation back into the forward pass; XLA:CPU drops it, so ``nn.remat``
  saves nothing there (``experiments/results/memory_notes.md``). Here the recomputation reads its
  inputs through :func:`tie_to`, a zero that depends on the incoming cotangent, so it cannot run
  before the backward pass reaches the block, whatever a backend does with barriers.

:func:`jaxlora.apply` takes ``remat=`` and does this for you, on NNX models too
(:mod:`jaxlora._src.forward.nnx_remat`, built on :func:`recompute` and :func:`hoisting_convert`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.core
import numpy as np

from jaxlora._src import paths, validate
from jaxlora._src.forward.ties import is_float, tie_to


def recompute(fun: Callable[..., Any], num_tied: int | None = None) -> Callable[..., Any]:
    """``fun`` with a VJP that keeps only its inputs and runs ``fun`` again in the backward pass.

    Args:
        fun: a function of positional array arguments (no closed-over tracers: pass them in, e.g.
            through ``jax.closure_convert``).
        num_tied: how many leading arguments the recomputation reads through :func:`tie_to`
            (default: all). Tie the activations, not big constant weights: tying copies the
            argument, and one tied input already orders the whole recomputation after the
            cotangent.

    Returns:
        A function with ``fun``'s values and gradients.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w))
        >>> w, x = jnp.ones((3, 2)), jnp.arange(6.0).reshape(2, 3)
        >>> g = jax.grad(recompute(f), argnums=(0, 1))(w, x)
        >>> all(jnp.allclose(a, b) for a, b in zip(g, jax.grad(f, argnums=(0, 1))(w, x)))
        True
    """
    validate.function("fun", fun)
    if num_tied is not None:
        validate.integer("num_tied", num_tied, minimum=0)

    @jax.custom_vjp
    def run(*args):
        return fun(*args)

    def forward(*args):
        return fun(*args), args

    def backward(args, cotangent):
        count = len(args) if num_tied is None else num_tied
        tied = [
            tie_to(x, cotangent) if i < count and is_float(x) else x for i, x in enumerate(args)
        ]
        _, vjp = jax.vjp(fun, *tied)
        return vjp(cotangent)

    run.defvjp(forward, backward)
    return run


class _Selection:
    """Which module paths a :func:`recompute_interceptor` recomputes, and which it saw (for the
    error)."""

    def __init__(self, modules: str | Sequence[str]):
        if isinstance(modules, str):
            self.spec: str | tuple[str, ...] = modules
        elif isinstance(modules, Sequence) and modules and all(isinstance(m, str) for m in modules):
            self.spec = tuple(modules)
        else:
            raise TypeError(
                "`remat` must be a regular expression (str) or a non-empty list of module names "
                f"(the `modules` of `checkpointed`), got {modules!r}"
            )
        self.seen: dict[str, None] = {}
        self.matched = 0

    def __call__(self, module: nn.Module) -> bool:
        where = paths.join(module.path)
        self.seen.setdefault(where)
        hit = bool(where) and paths.match_targets(self.spec, where)
        self.matched += hit
        return hit


def recompute_interceptor(modules: str | Sequence[str]) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor that recomputes the ``__call__`` of each
    module whose path matches ``modules`` in the backward pass (see :func:`recompute`).

    ``modules`` follows ``target_modules``' rules: a string is a regular expression full-matched
    against the ``/``-joined module path, a list names modules by path suffix. The selected
    calls must be pure in their variables (no ``batch_stats`` or cache writes); rngs are fine, the
    recomputation reuses the keys of the forward pass. Prefer :func:`checkpointed`, which also
    checks that something matched.
    """
    return _selection_interceptor(_Selection(modules))


def _state_ids(module: nn.Module) -> dict[str, list[int]]:
    """Identity of every non-param variable the module can see, to notice writes."""
    variables = module.variables
    return {k: [id(x) for x in jax.tree.leaves(v)] for k, v in variables.items() if k != "params"}


def hoisting_convert(call: Callable[..., Any], leaves: list) -> tuple[Callable[..., Any], list]:
    """``jax.closure_convert`` that hoists *every* traced value ``call`` closes over: params,
    PRNG keys and batched values alike (``closure_convert`` leaves the non-differentiable ones in
    the trace, where the backward pass would find them dead)."""
    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*leaves)
    hoist = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    hoisted = [c for c, h in zip(closed.consts, hoist, strict=True) if h]
    out_tree = jax.tree.structure(out_shape)

    def converted(*args):
        extra = iter(args[len(leaves) :])
        consts = [next(extra) if h else c for c, h in zip(closed.consts, hoist, strict=True)]
        out = jax.core.eval_jaxpr(closed.jaxpr, consts, *args[: len(leaves)])
        return jax.tree.unflatten(out_tree, out)

    return converted, hoisted


def _selection_interceptor(selected: _Selection) -> Callable[..., Any]:
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not selected(module) or module.is_initializing():
            return next_fun(*args, **kwargs)  # (an init has nothing to recompute)
        everything, treedef = jax.tree.flatten((args, kwargs))
        traced = [isinstance(x, jax.Array | np.ndarray) for x in everything]
        leaves = [x for x, t in zip(everything, traced, strict=True) if t]

        def call(*flat):
            given = iter(flat)
            full = [next(given) if t else x for x, t in zip(everything, traced, strict=True)]
            inner_args, inner_kwargs = jax.tree.unflatten(treedef, full)
            return next_fun(*inner_args, **inner_kwargs)

        # Traced now, while every interceptor (LoRA, quantised base) is active: the backward pass
        # replays this trace. Python values (flags, sizes) stay static; the module's params and
        # rngs are hoisted out as explicit inputs, so their gradients flow through the custom VJP.
        before = _state_ids(module)
        converted, consts = hoisting_convert(call, leaves)
        after = _state_ids(module)
        written = sorted(k for k in after if after[k] != before.get(k))
        if written:
            raise ValueError(
                f"`remat` selected `{paths.join(module.path)}`, which writes variables "
                f"({', '.join(written)}); a recomputed module must only read them. Select "
                "modules without batch statistics or caches, or apply without `remat`"
            )
        return recompute(converted, num_tied=len(leaves))(*leaves, *consts)

    return intercept


@contextlib.contextmanager
def checkpointed(modules: str | Sequence[str]) -> Iterator[None]:
    """Within the block, the linen modules matching ``modules`` are recomputed in the backward
    pass instead of keeping their activations (see :func:`recompute_interceptor`).

    Raises:
        ValueError: on leaving the block, when no module called inside it matched; the message
            lists the module paths that were called.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(8), nn.tanh, nn.Dense(1)])
        >>> params = model.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
        >>> def loss(params, remat):
        ...     if not remat:
        ...         return jnp.sum(model.apply({"params": params}, jnp.ones((2, 4))))
        ...     with checkpointed(r"layers_[01]"):
        ...         return jnp.sum(model.apply({"params": params}, jnp.ones((2, 4))))
        >>> a, b = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
        >>> all(jnp.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        True
    """
    selected = _Selection(modules)
    with nn.intercept_methods(_selection_interceptor(selected)):
        yield
    if not selected.matched:
        seen = [p for p in selected.seen if p]
        shown = f'"{modules}"' if isinstance(modules, str) else repr(list(modules))
        if not seen:
            raise ValueError(
                f"`remat={shown}`: no model was traced inside the block. Enter the block inside "
                "the function you jit: a step compiled earlier is not traced again"
            )
        raise ValueError(
            f"`remat={shown}` matched no module called in the model; module paths seen: "
            f"{paths.preview(seen)}"
        )
