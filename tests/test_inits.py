"""PiSSA initialisation and the rsLoRA scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import inits
from tests.treeutil import assert_trees_close


def _kernel(shape, seed=0):
    # A decaying spectrum, so the top-r subspace is well separated (randomised SVD converges).
    w = jax.random.normal(jax.random.key(seed), shape)
    decay = jnp.exp(-0.2 * jnp.arange(shape[-1], dtype=jnp.float32))
    return w * decay.reshape((1,) * (len(shape) - 1) + (-1,))


CASES = [((32, 24), "io", 4), ((2, 20, 16), "sio", 3), ((3, 3, 4, 10), "wwio", 2)]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("shape,layout,rank", CASES)
@pytest.mark.slow
def test_initial_output_unchanged_and_top_singular_values_removed(shape, layout, rank, use_jit):
    params = {"m": {"kernel": _kernel(shape), "bias": jnp.zeros(shape[-1])}}
    config = jaxlora.LoraConfig(
        r=rank, lora_alpha=3 * rank, target_modules=["m"], layouts={"m": layout}
    )
    split = jax.jit(inits.pissa_split, static_argnums=1) if use_jit else inits.pissa_split
    residual, lora = split(params, config, jax.random.key(1))
    assert_trees_close(jaxlora.merge(residual, lora, config), params, rtol=1e-5, atol=2e-5)
    n_stack = layout.count("s")
    stack = shape[:n_stack]
    matrix = np.asarray(params["m"]["kernel"], np.float64).reshape(stack + (-1, shape[-1]))
    left = np.asarray(residual["m"]["kernel"], np.float64).reshape(matrix.shape)
    s_full = np.linalg.svd(matrix, compute_uv=False)
    s_left = np.linalg.svd(left, compute_uv=False)
    np.testing.assert_allclose(s_left[..., :-rank], s_full[..., rank:], rtol=1e-4, atol=1e-4)
    # s·A·B is the best rank-r approximation U_r S_r V_rᵀ.
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    best = (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]
    update = 3.0 * np.asarray(jaxlora.delta(lora["m"]["lora_a"], lora["m"]["lora_b"], n_stack))
    np.testing.assert_allclose(update.reshape(best.shape), best, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_randomised_svd_keeps_the_output_and_finds_the_top_subspace():
    params = {"d": {"kernel": _kernel((64, 48), 3)}}
    config = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["d"])
    residual, lora = inits.pissa_split(params, config, jax.random.key(1), niter=4)
    assert_trees_close(jaxlora.merge(residual, lora, config), params, rtol=1e-5, atol=2e-5)
    s_full = np.linalg.svd(np.asarray(params["d"]["kernel"]), compute_uv=False)
    s_left = np.linalg.svd(np.asarray(residual["d"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s_left[0], s_full[4], rtol=1e-2)


def test_pissa_errors():
    params = {"d": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match=r"`lora_alpha` must be a finite number > 0"):
        jaxlora.LoraConfig(lora_alpha=0, target_modules=["d"])  # a zero scale: caught up front
    with pytest.raises(ValueError, match=r"PiSSA rank 8 at `d` exceeds the kernel's smaller side"):
        inits.pissa_split(params, jaxlora.LoraConfig(r=8, target_modules=["d"]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"`niter` must be None or an int >= 0, got -1"):
        inits.pissa_split(
            params, jaxlora.LoraConfig(r=1, target_modules=["d"]), jax.random.key(0), niter=-1
        )


@pytest.mark.parametrize("use_rslora,scale", [(False, 16 / 4), (True, 16 / 2)])
def test_rslora_scale_in_a_real_merge(use_rslora, scale):
    w = jax.random.normal(jax.random.key(0), (6, 5))
    config = jaxlora.LoraConfig(
        r=4, lora_alpha=16, target_modules=["d"], use_rslora=use_rslora, init_lora_weights=False
    )
    frozen, lora = jaxlora.split({"d": {"kernel": w}}, config, jax.random.key(1))
    merged = jaxlora.merge(frozen, lora, config)["d"]["kernel"]
    a, b = (np.asarray(lora["d"][k], np.float64) for k in ("lora_a", "lora_b"))
    expected = np.asarray(w, np.float64) + scale * (a @ b)  # alpha / sqrt(r) with rsLoRA
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6)
    assert config.scale_for("d") == scale
