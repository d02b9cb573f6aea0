"""The factored-path contract that tests/test_unseen_models.py and tests/test_third_party_models.py
check, each on its own zoo of models.

For a model with every kernel adapted and a non-trivial adapter (``init_lora_weights=False``):

1. ``jaxlora.apply(..., mode="factored")`` and ``mode="merged"`` give the same output
   (:func:`assert_factored_output_matches_merged`), which is not the base model's;
2. the gradients w.r.t. the adapter agree in both modes, and every adapter leaf gets a non-zero
   gradient (:func:`assert_factored_gradient_matches_merged`);
3. a few jitted Adam steps in factored mode (:func:`train_factored`) move every adapter leaf and
   leave the base bit for bit as it was (:func:`assert_training_moves_only_the_adapter`).

The helpers here know nothing of either zoo: how a model is built and run stays with its test file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.unseen_models import COMPILER_OPTIONS


def compiled(fn, *args):
    """``fn`` jitted for ``args``, compiled with :data:`tests.unseen_models.COMPILER_OPTIONS` (fast
    to compile; float32 results stay within rounding)."""
    return jax.jit(fn).lower(*args).compile(COMPILER_OPTIONS)


def float_leaves(tree) -> list:
    """The leaves of ``tree`` with a floating dtype, in tree order."""
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def paths(tree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf's path, in tree order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def probe(out):
    """A scalar linear in every float leaf of the output (fixed random weights)."""
    total = jnp.zeros((), jnp.float32)
    for i, leaf in enumerate(float_leaves(out)):
        weights = jax.random.normal(jax.random.fold_in(jax.random.key(4), i), leaf.shape)
        total = total + jnp.sum(leaf.astype(jnp.float32) * weights)
    return total


def probe_loss(run: Callable, probe: Callable = probe) -> Callable:
    """``lora -> (probe(out), out)`` for ``run: lora -> out`` (for ``has_aux=True`` gradients)."""

    def loss(lora):
        out = run(lora)
        return probe(out), out

    return loss


def snapshot(tree):
    """Host copies of every leaf (PRNG keys as their raw data), for bitwise comparison."""

    def host(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)

    return jax.tree.map(host, tree)


def train_factored(
    loss: Callable,
    lora,
    frozen,
    steps: int,
    numerics: Callable[[], Any] = contextlib.nullcontext,
) -> dict:
    """Run ``steps`` jitted Adam steps (learning rate 1e-2) on ``loss`` (a :func:`probe_loss`)
    from ``lora``; one compiled step computes the loss, output, gradient and update.

    ``numerics`` makes the context (e.g. ``jax.numpy_rank_promotion("allow")``) the optimizer
    is set up, compiled and run in. Returns host copies: ``"out"`` and ``"grads"`` at the initial
    adapter, the loss ``"values"`` before each step, the ``"trained"`` adapter, and the base
    (``frozen``) before and after (``"base_before"``, ``"base_after"``).
    """
    base_before = snapshot(frozen)
    grad = jax.value_and_grad(loss, has_aux=True)
    optimizer = optax.adam(1e-2)

    def step(lora, opt_state):
        (value, out), grads = grad(lora)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value, out, grads

    with numerics():
        opt_state = optimizer.init(lora)
        step = compiled(step, lora, opt_state)
        trained, opt_state, value, out, grads = step(lora, opt_state)
        values = [float(value)]
        for _ in range(steps - 1):
            trained, opt_state, value, _, _ = step(trained, opt_state)
            values.append(float(value))
    return {
        "out": jax.tree.map(np.asarray, out),
        "grads": jax.tree.map(np.asarray, grads),
        "values": values,
        "trained": snapshot(trained),
        "base_before": base_before,
        "base_after": snapshot(frozen),
    }


def run_merged(loss: Callable, lora, numerics: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """``loss`` (a :func:`probe_loss` on the merged path) and its gradient at ``lora``, jitted and
    run in the context ``numerics()`` makes. Returns host copies: ``"out"`` and ``"grads"``."""
    with numerics():
        grads, out = compiled(jax.grad(loss, has_aux=True), lora)(lora)
    return {"out": jax.tree.map(np.asarray, out), "grads": jax.tree.map(np.asarray, grads)}


def assert_close(actual, expected, rtol, what):
    """Leaf-wise |actual - expected| <= rtol * max|expected| (+ a float32-sized floor)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for path, a, b in zip(
        paths(expected), jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what} {path}: shape {a.shape} != {b.shape}"
        atol = rtol * np.abs(b).max() + 1e-7
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"{what} {path}")


def max_rel_diff(actual, expected) -> float:
    """The largest over float leaves of max|actual - expected| / max|expected|."""
    diffs = [
        np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
        / max(np.abs(np.asarray(b, np.float64)).max(), 1e-12)
        for a, b in zip(float_leaves(actual), float_leaves(expected), strict=True)
    ]
    return max(diffs)


def assert_every_leaf_has_gradient(grads_by_mode: dict):
    """Every leaf of each ``{mode: grads}`` tree has a non-zero gradient somewhere."""
    for mode, grads in grads_by_mode.items():
        zero = [p for p, g in zip(paths(grads), jax.tree.leaves(grads), strict=True) if not g.any()]
        assert not zero, f"{mode} mode: adapter leaves with an all-zero gradient: {zero}"


def assert_factored_output_matches_merged(factored: dict, merged: dict, base, rtol):
    """For results of :func:`train_factored` and :func:`run_merged`: the merged output differs
    from the ``base`` model's (else the case tests nothing), the factored one matches it within
    ``rtol`` (:func:`assert_close`) and differs from the base too (the adapter is not dropped)."""
    y_f, y_m = factored["out"], merged["out"]
    assert max_rel_diff(y_m, base) > 1e-3, "the adapter does not change the merged model: bad case"
    assert_close(y_f, y_m, rtol, "factored vs merged output")
    assert max_rel_diff(y_f, base) > 1e-3, "factored output is the base model's: adapter dropped"


def assert_factored_gradient_matches_merged(lora, factored: dict, merged: dict, rtol):
    """For results of :func:`train_factored` and :func:`run_merged` at ``lora``: the factored
    gradient has ``lora``'s structure, every adapter leaf gets a non-zero gradient in both modes
    (:func:`assert_every_leaf_has_gradient`), and the two agree within ``rtol``."""
    g_f, g_m = factored["grads"], merged["grads"]
    assert jax.tree.structure(g_f) == jax.tree.structure(lora)
    assert_every_leaf_has_gradient({"factored": g_f, "merged": g_m})
    assert_close(g_f, g_m, rtol, "factored vs merged gradient")


def assert_training_moves_only_the_adapter(lora, result, *, loss_goes_down=False):
    """For ``result`` from :func:`train_factored` started at ``lora``: the losses are finite (and,
    with ``loss_goes_down``, the last is below the first), training moved every adapter leaf, and
    the base is bit for bit as it was (same structure, dtypes and values)."""
    values = result["values"]
    assert np.all(np.isfinite(values)), values
    if loss_goes_down:
        assert values[-1] < values[0], f"the probe loss does not go down: {values}"
    before, after = snapshot(lora), result["trained"]
    still = [
        p
        for p, a, b in zip(
            paths(lora), jax.tree.leaves(after), jax.tree.leaves(before), strict=True
        )
        if np.array_equal(a, b)
    ]
    assert not still, f"adapter leaves that training did not move: {still}"
    base_before, base_after = result["base_before"], result["base_after"]
    assert jax.tree.structure(base_after) == jax.tree.structure(base_before)
    moved = [
        p
        for p, a, b in zip(
            paths(base_after),
            jax.tree.leaves(base_after),
            jax.tree.leaves(base_before),
            strict=True,
        )
        if not (a.dtype == b.dtype and np.array_equal(a, b))
    ]
    assert not moved, f"base leaves changed: {moved}"
