"""Laws that hold for every shape and rank, checked with hypothesis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora import LoraConfig

# Hypothesis sweeps of compiled merges: part of the full suite, not the fast core.
pytestmark = pytest.mark.slow

dims = st.integers(min_value=1, max_value=7)


@st.composite
def kernels(draw):
    n_stack = draw(st.integers(0, 1))
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    shape = tuple(draw(dims) for _ in range(n_stack + n_in + n_out))
    layout = "s" * n_stack + "i" * n_in + "o" * n_out
    rank = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    return shape, layout, rank, seed


def make(shape, layout, rank, seed, init=True):
    # NumPy's generator: jax.random would compile a program for every drawn shape.
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
    params = {"m": {"kernel": w}}
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["m"],
        layouts={"m": layout},
        init_lora_weights=init,
    )
    return params, config


@given(kernels())
def test_fresh_merge_is_identity(case):
    params, config = make(*case)
    frozen, lora = jaxlora.split(params, config, jax.random.key(case[3]))
    merged = jaxlora.merge(frozen, lora, config)
    assert (
        np.asarray(merged["m"]["kernel"]).tobytes() == np.asarray(params["m"]["kernel"]).tobytes()
    )


@given(kernels())
def test_unmerge_inverts_merge_and_rank_is_bounded(case):
    shape, layout, rank, seed = case
    params, config = make(*case, init=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(seed + 1))
    merged = jaxlora.merge(frozen, lora, config)
    np.testing.assert_allclose(
        jaxlora.unmerge(merged, lora, config)["m"]["kernel"],
        params["m"]["kernel"],
        rtol=1e-5,
        atol=1e-5,
    )
    diff = np.asarray(merged["m"]["kernel"] - params["m"]["kernel"], np.float64)
    n_stack, n_in = layout.count("s"), layout.count("i")
    layers = diff.reshape((-1,) + shape[n_stack:]) if n_stack else diff[None]
    rows = int(np.prod(shape[n_stack : n_stack + n_in]))
    for layer in layers:
        assert np.linalg.matrix_rank(layer.reshape(rows, -1), tol=1e-5) <= rank


@given(kernels())
def test_trainable_count_matches_formula(case):
    shape, layout, rank, _ = case
    params, config = make(*case)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    frozen, lora = jax.eval_shape(lambda p: jaxlora.split(p, config, jax.random.key(0)), abstract)
    n_stack, n_out = layout.count("s"), layout.count("o")
    stack = int(np.prod(shape[:n_stack]))
    fan_in = int(np.prod(shape[n_stack : len(shape) - n_out]))
    fan_out = int(np.prod(shape[len(shape) - n_out :]))
    assert jaxlora.count(frozen, lora).trainable == stack * rank * (fan_in + fan_out)
    assert jnp.dtype(lora["m"]["lora_a"].dtype) == jnp.float32
