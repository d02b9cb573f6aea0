"""The interpreter behind :func:`jaxlora.factored`: runs a jaxpr whose adapted weights are
:class:`~jaxlora._src.forward.lazy_weight.LazyWeight` values.

An equation none of whose inputs is a lazy weight is bound as it is. One that has a lazy input is
either followed (a layout op gives a new lazy weight; a contraction runs factored, see
:mod:`jaxlora._src.forward.contract`; a call or control-flow primitive is run again with its body
interpreted, so the weights stay lazy inside ``jit``, ``scan``, ``fori_loop`` / ``while_loop``,
``cond``, ``checkpoint`` and ``shard_map``), or the weight is folded, ``W + s·A·B``, and the
equation bound on the folded weight. So every use of an adapted weight sees either the low-rank
form or the merged weight, never the bare W.

A ``custom_jvp`` / ``custom_vjp`` function is bound on the folded weight: its own derivative rule
then differentiates the merged weight, and the chain rule carries that gradient to A and B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax import lax

from jaxlora._src.forward import contract, lora_dropout
from jaxlora._src.forward.lazy_weight import LazyWeight


def _lazy(x: Any) -> bool:
    return isinstance(x, LazyWeight)


def fold(x: Any) -> Any:
    """``x``, with a lazy weight folded to its merged value."""
    return x.merged() if _lazy(x) else x


def run(jaxpr: jcore.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """The outputs of ``jaxpr`` on ``args`` (some of them lazy weights); lazy outputs stay lazy."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(_lazy(x) for x in invals):
            rule = _RULES.get(eqn.primitive.name)
            outs = rule(eqn.params, invals) if rule is not None else None
        if outs is None:
            outs = _bind(eqn, [fold(x) for x in invals])
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def run_folded(jaxpr: jcore.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """:func:`run`, with lazy outputs folded (what a body handed back to JAX must return)."""
    return [fold(x) for x in run(jaxpr, consts, *args)]


def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple[Any, ...] = ()
    if isinstance(params, tuple):  # JAX before 0.7: (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _one(fn: Callable[..., Any]) -> Callable[[dict[str, Any], list[Any]], list[Any] | None]:
    """A rule for a one-output op on a lazy first operand (None when the op cannot follow)."""

    def rule(params, invals):
        if not _lazy(invals[0]) or any(_lazy(x) for x in invals[1:]):
            return None
        out = fn(params, *invals)
        return None if out is None else [out]

    return rule


def _contraction(fn):
    def rule(params, invals):
        if all(_lazy(x) for x in invals):
            return None
        out = fn(params, *invals)
        return None if out is None else [out]

    return rule


def _call(jaxpr_key: str):
    """A call (``jit``, ``closed_call``): its body run inline, weights still lazy."""

    def rule(params, invals):
        closed = params[jaxpr_key]
        jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
        return run(jaxpr, consts, *invals)

    return rule


def _remat(params, invals):
    lazy = {k: x for k, x in enumerate(invals) if _lazy(x)}
    plain = [x for x in invals if not _lazy(x)]

    def body(*plain_args):
        args = _interleave(invals, lazy, plain_args)
        return run_folded(params["jaxpr"], (), *args)

    return jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])(*plain)


def _interleave(invals: list[Any], fixed: dict[int, Any], rest: Sequence[Any]) -> list[Any]:
    """``invals``' positions filled from ``fixed`` where given, else from ``rest`` in order."""
    it = iter(rest)
    return [fixed[k] if k in fixed else next(it) for k in range(len(invals))]


def _passthrough(jaxpr: jcore.Jaxpr, n_before: int, n_carry: int) -> set[int]:
    """The carries a loop body hands back untouched (loop constants in disguise)."""
    return {k for k in range(n_carry) if jaxpr.outvars[k] is jaxpr.invars[n_before + k]}


def _scan(params, invals):
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    closed = params["jaxpr"]
    consts, carry, xs = (invals[:n_consts], invals[n_consts : n_consts + n_carry],
                         invals[n_consts + n_carry :])  # fmt: skip
    kept = _passthrough(closed.jaxpr, n_consts, n_carry)
    fixed_carry = {k: x for k, x in enumerate(carry) if _lazy(x) and k in kept}
    carry = [fold(x) if k not in fixed_carry else x for k, x in enumerate(carry)]
    lazy_xs = {k: x for k, x in enumerate(xs) if _lazy(x)}
    scanned = {k: _scanned(x) for k, x in lazy_xs.items()}
    plain_carry = [x for k, x in enumerate(carry) if k not in fixed_carry]
    plain_xs = [x for k, x in enumerate(xs) if k not in lazy_xs]

    site, rate = lora_dropout.site_key(), lora_dropout.rate()

    def body(c, x):
        plain, sliced, index = x
        full_carry = _interleave(carry, fixed_carry, c)
        slices = {k: rebuild(sliced[k]) for k, (rebuild, _) in scanned.items()}
        full_xs = _interleave(xs, slices, plain)
        with lora_dropout.scope(lora_dropout.step(site, index), rate):
            outs = run_folded(closed.jaxpr, closed.consts, *consts, *full_carry, *full_xs)
        c_out, ys = outs[:n_carry], outs[n_carry:]
        return [c_out[k] for k in range(n_carry) if k not in fixed_carry], ys

    stacked = {k: arrays for k, (_, arrays) in scanned.items()}
    steps = None if site is None else jnp.arange(params["length"], dtype=jnp.uint32)
    c, ys = lax.scan(body, plain_carry, (plain_xs, stacked, steps), length=params["length"],
                     reverse=params["reverse"], unroll=params["unroll"])  # fmt: skip
    return _interleave(carry, fixed_carry, c) + list(ys)


def _scanned(w: LazyWeight):
    """How a lazy weight scanned over its leading axis travels through ``lax.scan``: the arrays
    that have that axis (view, and A and/or B, the axis moved to the front), and a function that
    rebuilds the lazy weight of one step from their slices."""
    label = w.labels[0]
    a_k = w.a_labels.index(label) if label in w.a_labels else None
    b_k = w.b_labels.index(label) if label in w.b_labels else None
    arrays = {"weight": w.weight}
    if a_k is not None:
        arrays["a"] = jax.numpy.moveaxis(w.a, a_k, 0)
    if b_k is not None:
        arrays["b"] = jax.numpy.moveaxis(w.b, b_k, 0)

    def rebuild(sliced):
        drop = lambda labels: tuple(lab for lab in labels if lab != label)  # noqa: E731
        a_labels = w.a_labels if a_k is None else drop(w.a_labels)
        b_labels = w.b_labels if b_k is None else drop(w.b_labels)
        return dataclasses.replace(
            w, weight=sliced["weight"], a=sliced.get("a", w.a), b=sliced.get("b", w.b),
            labels=w.labels[1:], a_labels=a_labels, b_labels=b_labels,
        )  # fmt: skip

    return rebuild, arrays


def _while(params, invals):
    n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]
    cond, body_j = params["cond_jaxpr"], params["body_jaxpr"]
    cond_consts, body_consts = invals[:n_cc], invals[n_cc : n_cc + n_bc]
    carry = invals[n_cc + n_bc :]
    kept = _passthrough(body_j.jaxpr, n_bc, len(carry))
    fixed = {k: x for k, x in enumerate(carry) if _lazy(x) and k in kept}
    carry = [x if k in fixed else fold(x) for k, x in enumerate(carry)]

    site, rate = lora_dropout.site_key(), lora_dropout.rate()
    # With dropout on, a step counter rides as the last carry: each step draws its own masks.
    counted = site is not None

    def cond_fun(c):
        full = _interleave(carry, fixed, c[:-1] if counted else c)
        return run_folded(cond.jaxpr, cond.consts, *cond_consts, *full)[0]

    def body_fun(c):
        full = _interleave(carry, fixed, c[:-1] if counted else c)
        with lora_dropout.scope(lora_dropout.step(site, c[-1]) if counted else None, rate):
            outs = run_folded(body_j.jaxpr, body_j.consts, *body_consts, *full)
        outs = [x for k, x in enumerate(outs) if k not in fixed]
        return outs + [c[-1] + 1] if counted else outs

    init = [x for k, x in enumerate(carry) if k not in fixed]
    out = lax.while_loop(cond_fun, body_fun, init + [jnp.uint32(0)] if counted else init)
    return _interleave(carry, fixed, out[:-1] if counted else out)


def _cond(params, invals):
    index, ops = invals[0], invals[1:]
    if _lazy(index):
        return None
    lazy = {k: x for k, x in enumerate(ops) if _lazy(x)}
    plain = [x for k, x in enumerate(ops) if k not in lazy]
    branches = [
        (lambda *p, b=b: run_folded(b.jaxpr, b.consts, *_interleave(ops, lazy, p)))
        for b in params["branches"]
    ]
    return list(lax.switch(index, branches, *plain))


def _shard_map(params, invals):
    """The body mapped again, each lazy weight entering as its view and factors, the factors
    sharded as the view's axes they hold (the rank axis replicated)."""
    specs, arrays, slots = [], [], []
    for x, spec in zip(invals, params["in_specs"], strict=True):
        slots.append(len(arrays))
        if not _lazy(x):
            specs.append(spec)
            arrays.append(x)
            continue
        padded = tuple(spec) + (None,) * (x.weight.ndim - len(spec))
        entry = dict(zip(x.labels, padded, strict=True))
        specs.extend([spec, *(jax.sharding.PartitionSpec(*(entry.get(lab) for lab in labels))
                              for labels in (x.a_labels, x.b_labels))])  # fmt: skip
        arrays.extend([x.weight, x.a, x.b])

    def body(*local):
        args = [
            dataclasses.replace(x, weight=local[at], a=local[at + 1], b=local[at + 2])
            if _lazy(x) else local[at]
            for x, at in zip(invals, slots, strict=True)
        ]  # fmt: skip
        return tuple(run_folded(params["jaxpr"], (), *args))

    mapped = jax.shard_map(body, mesh=params["mesh"], in_specs=tuple(specs),
                           out_specs=params["out_specs"], check_vma=params["check_vma"],
                           axis_names=params["newly_manual_axes"])  # fmt: skip
    return list(mapped(*arrays))


_RULES: dict[str, Callable[[dict[str, Any], list[Any]], list[Any] | None]] = {
    "transpose": _one(lambda p, w: w.transpose(tuple(p["permutation"]))),
    "convert_element_type": _one(lambda p, w: w.astype(p["new_dtype"])),
    "reshape": _one(lambda p, w: None if p.get("dimensions") else w.reshape(tuple(p["new_sizes"]))),
    "squeeze": _one(lambda p, w: w.squeeze(tuple(p["dimensions"]))),
    "copy": _one(lambda p, w: w),
    "copy_p": _one(lambda p, w: w),
    "dynamic_slice": _one(lambda p, w, *starts: w.slice(starts, tuple(p["slice_sizes"]))),
    "slice": _one(
        lambda p, w: (
            None
            if p.get("strides")
            else w.slice(
                tuple(p["start_indices"]),
                tuple(
                    hi - lo for lo, hi in zip(p["start_indices"], p["limit_indices"], strict=True)
                ),
            )
        )
    ),
    "dot_general": _contraction(contract.dot_general),
    "conv_general_dilated": _contraction(contract.conv),
    "jit": _call("jaxpr"),
    "pjit": _call("jaxpr"),
    "closed_call": _call("call_jaxpr"),
    "core_call": _call("call_jaxpr"),
    "remat2": lambda p, v: list(_remat(p, v)),
    "checkpoint": lambda p, v: list(_remat(p, v)),
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "shard_map": _shard_map,
}
