"""Kernel layouts read off how a plain JAX function contracts its params (``jaxlora.infer_layouts``
of a function).

The function is traced to a jaxpr, abstractly, and each kernel's axes are followed through the
ops that only move them (transposes, reshapes, casts, slices, calls and control flow) to the
contractions that use them: an axis a ``dot_general`` contracts is an input axis ``i``, one it
keeps an output axis ``o``, one it batches over (or a scan or an index runs over) a stacked axis
``s``; a convolution's spatial kernel axes are window axes ``w``. A kernel whose axes get one
letter each, in an order a layout allows, gets that layout; one used inconsistently, or never in
a contraction, is left out (``split`` then asks for its layout if it needs one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxlora._src import paths
from jaxlora._src.config import axes_order
from jaxlora._src.config.targets import KERNEL
from jaxlora._src.forward.lazy_weight import reshape_groups

#: One tracked value: (kernel index, for each of its axes the kernel axes it stands for).
Track = tuple[int, tuple[frozenset[int], ...]]
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "shard_map": "jaxpr"}  # fmt: skip


class _Letters:
    """The letters seen for each axis of each kernel."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], set[str]] = {}

    def mark(self, track: Track, dims: Any, letter: str) -> None:
        leaf, axes = track
        for d in dims:
            for axis in axes[d]:
                self.seen.setdefault((leaf, axis), set()).add(letter)


def _jaxpr_of(param: Any) -> tuple[jcore.Jaxpr, Any]:
    return (param.jaxpr, param.consts) if hasattr(param, "consts") else (param, ())


def _move(name: str, params: dict[str, Any], track: Track, letters: _Letters) -> Track | None:
    """The track of a layout op's output, or None where the op is not one."""
    leaf, axes = track
    if name in ("convert_element_type", "copy", "copy_p", "dynamic_slice", "slice"):
        return track
    if name == "transpose":
        return leaf, tuple(axes[p] for p in params["permutation"])
    if name == "squeeze":
        letters.mark(track, params["dimensions"], "s")  # an index into a stack of layers
        return leaf, tuple(a for k, a in enumerate(axes) if k not in params["dimensions"])
    return None


def _walk(jaxpr: jcore.Jaxpr, tracks: list[Track | None], letters: _Letters) -> list[Any]:
    env: dict[Any, Track] = {v: t for v, t in zip(jaxpr.invars, tracks, strict=True) if t}
    for eqn in jaxpr.eqns:
        ins = [None if isinstance(v, jcore.Literal) else env.get(v) for v in eqn.invars]
        if not any(ins):
            continue
        name, params = eqn.primitive.name, eqn.params
        outs: list[Track | None] = []
        if name == "dot_general":
            _contracted(params, ins, letters)
        elif name == "conv_general_dilated" and ins[1]:
            _, rhs_spec, _ = params["dimension_numbers"]
            letters.mark(ins[1], (rhs_spec[0],), "o")
            letters.mark(ins[1], (rhs_spec[1],), "i")
            letters.mark(ins[1], rhs_spec[2:], "w")
        elif name == "reshape" and ins[0] and not params.get("dimensions"):
            old_shape = tuple(getattr(eqn.invars[0].aval, "shape", ()))
            outs = [_regrouped(ins[0], old_shape, params["new_sizes"])]
        elif name in _CALLS:
            inner, _ = _jaxpr_of(params[_CALLS[name]])
            outs = _walk(inner, ins, letters)
        elif name == "scan":
            outs = _scan(params, ins, letters)
        elif name == "while":
            n = params["cond_nconsts"]
            _walk(params["body_jaxpr"].jaxpr, ins[n:], letters)
        elif name == "cond":
            for branch in params["branches"]:
                _walk(branch.jaxpr, ins[1:], letters)
        elif ins[0] and not any(ins[1:]):
            outs = [_move(name, params, ins[0], letters)]
        for v, t in zip(eqn.outvars, outs, strict=False):
            if t is not None:
                env[v] = t
    return [env.get(v) if not isinstance(v, jcore.Literal) else None for v in jaxpr.outvars]


def _contracted(params: dict[str, Any], ins: list[Any], letters: _Letters) -> None:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = params["dimension_numbers"]
    for track, contract, batch in ((ins[0], lhs_c, lhs_b), (ins[1], rhs_c, rhs_b)):
        if track:
            free = [d for d in range(len(track[1])) if d not in (*contract, *batch)]
            letters.mark(track, contract, "i")
            letters.mark(track, batch, "s")
            letters.mark(track, free, "o")


def _regrouped(track: Track, old: tuple[int, ...], new: tuple[int, ...]) -> Track | None:
    leaf, axes = track
    groups = reshape_groups(tuple(old), tuple(new))
    if groups is None:
        return None
    out: list[frozenset[int]] = [frozenset()] * len(new)
    for olds, news in groups:
        union = frozenset().union(*(axes[k] for k in olds))
        for k in news:
            out[k] = union
    return leaf, tuple(out)


def _scan(params: dict[str, Any], ins: list[Any], letters: _Letters) -> list[Any]:
    n_fixed = params["num_consts"] + params["num_carry"]
    body_in = list(ins[:n_fixed])
    for track in ins[n_fixed:]:
        if track:
            letters.mark(track, (0,), "s")
            body_in.append((track[0], track[1][1:]))
        else:
            body_in.append(None)
    _walk(params["jaxpr"].jaxpr, body_in, letters)
    return []


def function_layouts(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> dict[str, str]:
    """``{module path: layout}`` of the kernels of ``params`` as ``fn(params, *args)`` uses them.

    Traced abstractly (``jax.make_jaxpr``); ``args`` may be arrays or ``jax.ShapeDtypeStruct``,
    other arguments reach ``fn`` as they are.
    """
    found = [(names, leaf) for _, names, leaf in paths.flatten(params)]
    kernels = {k for k, (names, leaf) in enumerate(found)
               if names and names[-1] == KERNEL and np.ndim(leaf) >= 2}  # fmt: skip
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
    traced = [k for k, x in enumerate(arg_leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def flat_fn(p, dynamic):
        full = list(arg_leaves)
        for k, x in zip(traced, dynamic, strict=True):
            full[k] = x
        call_args, call_kwargs = jax.tree.unflatten(arg_tree, full)
        return fn(p, *call_args, **call_kwargs)

    closed = jax.make_jaxpr(flat_fn)(shapes, [arg_leaves[k] for k in traced])
    n_params = len(found)
    tracks: list[Track | None] = [
        (k, tuple(frozenset({a}) for a in range(np.ndim(found[k][1])))) if k in kernels else None
        for k in range(n_params)
    ]
    tracks += [None] * (len(closed.jaxpr.invars) - n_params)
    letters = _Letters()
    _walk(closed.jaxpr, tracks, letters)
    layouts = {}
    for k in sorted(kernels):
        names, leaf = found[k]
        seen = [letters.seen.get((k, a), set()) for a in range(np.ndim(leaf))]
        if all(len(s) == 1 for s in seen):
            layout = "".join(next(iter(s)) for s in seen)
            if axes_order.layout_problem(layout) is None:
                layouts[paths.join(names[:-1])] = layout
    return layouts
