"""Equinox model code from an installed package: ESM2 as ``esm2quinox`` ships it (never copied in).

ESM2 (a protein masked language model) is written there in Equinox's own idioms: its transformer
layers are made by ``eqx.filter_vmap`` and run by ``lax.scan`` inside an ``eqx.filter_jit``-ed
method, its attention is ``eqx.nn.MultiheadAttention`` with rotary embeddings, its stacked
LayerNorms have 2-D ``weight`` leaves, and its input embedding is the output head's weight read
as an ``eqx.nn.Embedding`` (a tied weight used twice). jaxlora adapts it as it comes: the targets
read like PEFT's, factored equals merged in loss and gradients, every adapter leaf trains, the
base never moves and a fresh adapter is the base bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

eqx = pytest.importorskip("equinox")
esm2quinox = pytest.importorskip("esm2quinox")

LAYERS = r"layers/.*(proj|linear\d)"  # the transformer layers' projections, not the head's


@functools.cache
def _esm2():
    """A two-layer ESM2 (width 16, 2 heads), its tokens with mask (``#``) and padding, and the
    masked-LM targets (the unmasked protein; pads weigh 0)."""
    model = esm2quinox.ESM2(
        num_layers=2, embed_size=16, num_heads=2, token_dropout=True, key=jax.random.key(0)
    )
    masked = jnp.asarray(esm2quinox.tokenise(["SP#DER#AN", "MKT#LV"], length=12))
    targets = jnp.asarray(esm2quinox.tokenise(["SPIDERMAN", "MKTALV"], length=12))
    return model, masked, targets


def _abstract_esm2():
    """The same model as shapes only (``eqx.filter_eval_shape``): nothing initialised."""
    return eqx.filter_eval_shape(esm2quinox.ESM2, 2, 16, 2, True, jax.random.key(0))


def _mlm_loss(model, tokens, targets):
    logits = jax.vmap(model)(tokens).logits
    weights = (targets != 1).astype(logits.dtype)  # 1: the padding token
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.sum(weights)


def test_targets_read_like_peft_and_skip_the_stacked_layer_norms():
    model = _abstract_esm2()
    config = jaxlora.LoraConfig(r=2, target_modules="all-linear")
    targets = {t.path: t.layout for t in jaxlora.find_targets(model, config)}
    assert targets == {
        "layers/attn/query_proj": "soi", "layers/attn/key_proj": "soi",
        "layers/attn/value_proj": "soi", "layers/attn/output_proj": "soi",
        "layers/linear1": "soi", "layers/linear2": "soi",
        "logit_head/linear1": "oi", "logit_head/linear2": "oi",
    }  # fmt: skip
    # The stacked LayerNorm scales are 2-D (layers, 16) `weight` leaves, and still no target.
    assert model.layers.layer_norm1.weight.shape == (2, 16)
    frozen, lora = eqx.filter_eval_shape(
        lambda m: jaxlora.split(m, config, jax.random.key(1)), model
    )
    assert "layer_norm1" not in lora["layers"]
    assert jaxlora.count(frozen, lora).trainable == sum(x.size for x in jax.tree.leaves(lora))


#: fair-esm's (PyTorch) names of the layers' projections, for PEFT files of the stacked layers.
TORCH_NAMES = {
    "attn/query_proj": "self_attn.q_proj", "attn/key_proj": "self_attn.k_proj",
    "attn/value_proj": "self_attn.v_proj", "attn/output_proj": "self_attn.out_proj",
    "linear1": "fc1", "linear2": "fc2",
}  # fmt: skip


def _torch_name(path, index):
    """fair-esm's name of layer ``index`` of ``path``; None for a module without one."""
    name = TORCH_NAMES.get(path.removeprefix("layers/"))
    if not path.startswith("layers/") or name is None or len(index) != 1:
        return None
    return f"layers.{index[0]}.{name}"


@pytest.mark.slow  # builds ESM2
def test_peft_file_of_the_stacked_layers_names_one_module_per_layer(tmp_path):
    model, _, _ = _esm2()
    config = jaxlora.LoraConfig(r=2, target_modules=LAYERS, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, jax.random.key(1))
    with pytest.raises(ValueError, match="stacked module `layers/attn/query_proj`"):
        jaxlora.save_peft(tmp_path / "unnamed", lora, config, frozen)
    jaxlora.save_peft(tmp_path, lora, config, frozen, module_name=_torch_name)
    from safetensors.numpy import load_file

    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.layers.1.self_attn.q_proj.lora_A.weight"] == (2, 16)
    assert shapes["base_model.model.layers.0.fc1.lora_B.weight"] == (64, 2)  # (out, r)
    assert len(shapes) == 2 * 2 * len(TORCH_NAMES)  # A and B, per layer, per projection
    loaded, _ = jaxlora.load_peft(tmp_path, frozen, module_name=_torch_name)
    assert_trees_bitwise_equal(loaded, lora)


@pytest.mark.slow  # compiles ESM2's training step, factored and merged
@pytest.mark.standard_dtypes  # esm2quinox mixes Python floats with int32 counts
def test_factored_esm2_trains_as_merged_and_keeps_the_base():
    model, tokens, targets = _esm2()
    config = jaxlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, jax.random.key(1))
    loss = jaxlora.factored(_mlm_loss, config)

    @eqx.filter_jit
    def factored_value_and_grad(lora, frozen):
        return eqx.filter_value_and_grad(lambda t: loss(frozen, t, tokens, targets))(lora)

    merged = eqx.filter_jit(jax.value_and_grad(
        lambda t, frozen: _mlm_loss(jaxlora.merge(frozen, t, config), tokens, targets)
    ))(lora, frozen)  # fmt: skip
    got = factored_value_and_grad(lora, frozen)
    assert_trees_close(got[0], merged[0], rtol=1e-5)
    for g, want in zip(jax.tree.leaves(got[1]), jax.tree.leaves(merged[1]), strict=True):
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-4 * float(jnp.abs(want).max()))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(got[1]))

    # Training moves every adapter leaf and never the base.
    base_before = jax.tree.map(np.array, eqx.filter(frozen, eqx.is_array))
    optimizer = optax.adam(1e-2)
    state, trained = optimizer.init(lora), lora
    for _ in range(3):
        value, grads = factored_value_and_grad(trained, frozen)
        updates, state = optimizer.update(grads, state, trained)
        trained = optax.apply_updates(trained, updates)
    assert float(value) < float(got[0])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained, lora)
    assert all(jax.tree.leaves(moved))
    assert_trees_bitwise_equal(eqx.filter(frozen, eqx.is_array), base_before)

    # A fresh adapter (B = 0) is the base, bit for bit, jitted (op by op too, which
    # test_equinox.py's scanned transformer checks: ESM2 eagerly costs 9 s).
    fresh_config = jaxlora.LoraConfig(r=2, target_modules="all-linear")
    fresh = jaxlora.split(model, fresh_config, jax.random.key(2))[1]
    jitted = eqx.filter_jit(loss)(frozen, fresh, tokens, targets)
    assert_trees_bitwise_equal(jitted, eqx.filter_jit(_mlm_loss)(model, tokens, targets))
