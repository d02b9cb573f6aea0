"""The factored path on models not written with jaxlora in mind (tests/unseen_models.py).

jaxlora's promise: for every adapted kernel, ``jaxlora.apply(..., mode="factored")`` uses the
adapter exactly as :func:`jaxlora.merge` would (``mode="merged"``), or raises a clear error naming
the module; an adapted kernel is never silently unused. For each model x framework, with every
kernel adapted and a non-trivial adapter (``init_lora_weights=False``: B != 0):

1. factored and merged outputs agree (float32, 1e-5 of the output's scale), and differ from the
   base model's: the adapter is not dropped;
2. the gradients w.r.t. the adapter agree in both modes, and every adapter leaf gets a non-zero
   gradient;
3. a few jitted Adam steps in factored mode move every adapter leaf and leave the base bit for bit
   as it was.

Every case is supported: a layer the low-rank term does not know runs on its merged weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from tests import unseen_models
from tests.unseen_models import BY_ID

# The fast core (`-m "not slow"`) runs the cases that exercise the guarantee's distinct reads of a
# weight (a subclass, a raw param, a parent reading a child's kernel, a scaled and a hand-tied
# embedding); every case runs in the full suite.
FAST_CASES = {
    "dense_subclass-linen",
    "dense_subclass-nnx",
    "raw_kernel-linen",
    "kernel_reads-nnx",
    "scaled_embed-linen",
    "tied_embed_by_hand-nnx",
}
SUPPORTED = [
    pytest.param(case.id, marks=[] if case.id in FAST_CASES else [pytest.mark.slow])
    for case in unseen_models.CASES
]
OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
STEPS = 3


@functools.cache
def _setup(case_id):
    """``(built, config, frozen, lora)`` for a case: every kernel adapted, B != 0."""
    case = BY_ID[case_id]
    built = case.build()
    config = jaxlora.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=case.target_modules,
        layouts=dict(case.layouts),
        init_lora_weights=False,
    )
    # split under jit (it supports it) only to save op-by-op time; ``frozen`` is ``params`` itself.
    key = jax.random.key(1)
    _, lora = _compile(lambda params, key: jaxlora.split(params, config, key), built.params, key)(
        built.params, key
    )
    return built, config, built.params, lora


def _run(built, frozen, config, mode):
    """``lora -> model output`` in ``mode``."""

    def run(lora):
        extra = {} if built.variables is None else {"variables": built.variables}
        return jaxlora.apply(built.model, frozen, lora, config, *built.args, mode=mode,
                             rngs=built.rngs, **extra, **built.kwargs)  # fmt: skip

    return run


def _base_output(built):
    """The model without any adapter, run the plain Flax way (jitted)."""
    if isinstance(built.model, nnx.GraphDef):

        def base(params):
            return nnx.merge(built.model, params)(*built.args, **built.kwargs)

    else:

        def base(params):
            variables = {**(built.variables or {}), "params": params}
            return built.model.apply(variables, *built.args, rngs=built.rngs, **built.kwargs)

    return _compile(base, built.params)(built.params)


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _probe(out):
    """A scalar linear in every float leaf of the output (fixed random weights)."""
    total = jnp.zeros((), jnp.float32)
    for i, leaf in enumerate(_float_leaves(out)):
        weights = jax.random.normal(jax.random.fold_in(jax.random.key(4), i), leaf.shape)
        total = total + jnp.sum(leaf.astype(jnp.float32) * weights)
    return total


def _compile(fn, *args):
    """``fn`` jitted for ``args``, compiled with :data:`unseen_models.COMPILER_OPTIONS`."""
    return jax.jit(fn).lower(*args).compile(unseen_models.COMPILER_OPTIONS)


def _loss(run):
    def loss(lora):
        out = run(lora)
        return _probe(out), out

    return loss


@functools.cache
def _factored(case_id):
    """The factored path, jitted: the output and adapter gradient at the initial adapter, and the
    adapter and base after :data:`STEPS` Adam steps (one compiled step computes all of it)."""
    built, config, frozen, lora = _setup(case_id)
    base_before = _snapshot(frozen)
    grad = jax.value_and_grad(_loss(_run(built, frozen, config, "factored")), has_aux=True)
    optimizer = optax.adam(1e-2)

    def step(lora, opt_state):
        (value, out), grads = grad(lora)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value, out, grads

    opt_state = optimizer.init(lora)
    compiled = _compile(step, lora, opt_state)
    trained, opt_state, value, out, grads = compiled(lora, opt_state)
    values = [float(value)]
    for _ in range(STEPS - 1):
        trained, opt_state, value, _, _ = compiled(trained, opt_state)
        values.append(float(value))
    return {
        "out": jax.tree.map(np.asarray, out),
        "grads": jax.tree.map(np.asarray, grads),
        "values": values,
        "trained": _snapshot(trained),
        "base_before": base_before,
        "base_after": _snapshot(frozen),
    }


@functools.cache
def _merged(case_id):
    """The merged path, jitted: the output and adapter gradient at the initial adapter."""
    built, config, frozen, lora = _setup(case_id)
    grad = jax.grad(_loss(_run(built, frozen, config, "merged")), has_aux=True)
    grads, out = _compile(grad, lora)(lora)
    return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, grads)


def _paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _assert_close(actual, expected, rtol, what):
    """Leaf-wise |actual - expected| <= rtol * max|expected| (+ a float32-sized floor)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for path, a, b in zip(
        _paths(expected), jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what} {path}: shape {a.shape} != {b.shape}"
        atol = rtol * np.abs(b).max() + 1e-7
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"{what} {path}")


def _max_rel_diff(actual, expected):
    diffs = [
        np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
        / max(np.abs(np.asarray(b, np.float64)).max(), 1e-12)
        for a, b in zip(_float_leaves(actual), _float_leaves(expected), strict=True)
    ]
    return max(diffs)


def _snapshot(tree):
    """Host copies of every leaf (PRNG keys as their raw data), for bitwise comparison."""

    def host(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)

    return jax.tree.map(host, tree)


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_output_equals_merged(case_id):
    built, _, _, _ = _setup(case_id)
    y_f = _factored(case_id)["out"]
    y_m, _ = _merged(case_id)
    base = _base_output(built)
    assert _max_rel_diff(y_m, base) > 1e-3, "the adapter does not change the merged model: bad case"
    _assert_close(y_f, y_m, OUTPUT_RTOL, "factored vs merged output")
    assert _max_rel_diff(y_f, base) > 1e-3, "factored output is the base model's: adapter dropped"


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_gradient_equals_merged(case_id):
    _, _, _, lora = _setup(case_id)
    g_f = _factored(case_id)["grads"]
    _, g_m = _merged(case_id)
    assert jax.tree.structure(g_f) == jax.tree.structure(lora)
    for mode, grads in [("factored", g_f), ("merged", g_m)]:
        zero = [
            p for p, g in zip(_paths(grads), jax.tree.leaves(grads), strict=True) if not g.any()
        ]
        assert not zero, f"{mode} mode: adapter leaves with an all-zero gradient: {zero}"
    _assert_close(g_f, g_m, GRAD_RTOL, "factored vs merged gradient")


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_training_moves_only_the_adapter(case_id):
    _, _, _, lora = _setup(case_id)
    result = _factored(case_id)
    values = result["values"]
    assert np.all(np.isfinite(values)), values
    assert values[-1] < values[0], f"the probe loss does not go down: {values}"
    before, after = _snapshot(lora), result["trained"]
    still = [
        p
        for p, a, b in zip(
            _paths(lora), jax.tree.leaves(after), jax.tree.leaves(before), strict=True
        )
        if np.array_equal(a, b)
    ]
    assert not still, f"adapter leaves that training did not move: {still}"
    base_before, base_after = result["base_before"], result["base_after"]
    assert jax.tree.structure(base_after) == jax.tree.structure(base_before)
    moved = [
        p
        for p, a, b in zip(
            _paths(base_after),
            jax.tree.leaves(base_after),
            jax.tree.leaves(base_before),
            strict=True,
        )  # fmt: skip
        if not (a.dtype == b.dtype and np.array_equal(a, b))
    ]
    assert not moved, f"base leaves changed: {moved}"


def test_every_case_has_a_linen_and_an_nnx_peer():
    """The zoo stays paired: each model in both frameworks (ConvLocal exists in linen only)."""
    names = {case.name for case in unseen_models.CASES}
    for name in names:
        frameworks = {c.framework for c in unseen_models.CASES if c.name == name}
        assert frameworks == ({"linen"} if name == "conv_local" else {"linen", "nnx"}), name
