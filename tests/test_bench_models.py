"""The benchmark GPT's forms compute one function, so their groups of ``bench_train_step.py`` time
the same work: the linen ``models_gpt.GPT``, the plain-JAX ``models_gpt.plain_gpt`` and the
Equinox ``models_gpt_eqx.GPT`` built from the linen params."""

import jax
import jax.numpy as jnp
import pytest

import jaxlora
from experiments.benchmarks import models_gpt
from tests.treeutil import assert_trees_close, perturbed

eqx = pytest.importorskip("equinox")
models_gpt_eqx = pytest.importorskip("experiments.benchmarks.models_gpt_eqx")


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.slow  # compiles the three models (~2-4 s on 2 cores)
def test_equinox_gpt_computes_the_linen_gpt():
    c = models_gpt.TINY

    @jax.jit  # one small program: init, the three forms and their logits
    def logits(ids):
        model, params = models_gpt.init(c, jax.random.key(0))
        params = perturbed(params, seed=1)  # non-zero biases, non-unit scales: every leaf counts
        eqx_model = models_gpt_eqx.from_params(params, c)
        return (model.apply({"params": params}, ids), models_gpt.plain_gpt(params, ids, c),
                jax.vmap(eqx_model)(ids))  # fmt: skip

    linen, plain, equinox = logits(jax.random.randint(jax.random.key(2), (2, c.seq), 0, c.vocab))
    assert_trees_close(equinox, linen, rtol=1e-5, atol=1e-5)
    assert_trees_close(plain, linen, rtol=1e-5, atol=1e-5)


def test_equinox_gpt_has_the_linen_gpts_parameters_and_adapters():
    """At the benchmark's own size (shapes only): the same parameter count, and every config
    adapts the same number of weights."""
    c = models_gpt.GPTConfig()
    ids = jax.ShapeDtypeStruct((1, c.seq), jnp.int32)
    params = jax.eval_shape(models_gpt.GPT(c).init, jax.random.key(0), ids)["params"]
    model = jax.eval_shape(lambda: models_gpt_eqx.GPT(c, jax.random.key(0)))
    arrays = eqx.filter(model, lambda x: jnp.issubdtype(x.dtype, jnp.inexact))
    assert _size(arrays) == _size(params) == 34_742_784
    for targets in (["q_proj", "v_proj"], "all-linear"):
        config = jaxlora.LoraConfig(r=8, target_modules=targets)

        def adapter(tree, config=config):
            return jaxlora.split(tree, config, jax.random.key(1))[1]

        assert _size(jax.eval_shape(adapter, arrays)) == _size(jax.eval_shape(adapter, params))
