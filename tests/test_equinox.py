"""Equinox models as params: split, merge, unmerge, count, files and checkpoints on ``eqx.Module``.

An Equinox Linear's ``weight`` is ``(out, in)``, a Conv's ``(out, in, *window)``, an Embedding's
``(vocab, dim)``: jaxlora reads these off the tree, so ``merged(x) = base(x) + s·((x·A)·B)`` per
layer, which the merged forward of each model proves here against the factored arithmetic.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import adapters, checkpoint
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

eqx = pytest.importorskip("equinox")

KEY = jax.random.key(0)
EVERYTHING = ".*"  # a regex: every weight of the model


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(4, 4, 3, padding=1, key=k1)
        self.head = eqx.nn.Linear(4, 4, key=k2)

    def __call__(self, x):
        return self.head(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))


class Attention(eqx.Module):
    attn: eqx.nn.MultiheadAttention

    def __call__(self, x):
        return self.attn(x, x, x)


class Tagger(eqx.Module):
    emb: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __call__(self, ids):
        h = jax.vmap(self.emb)(ids)  # (T, D)
        return jax.vmap(self.head)(self.conv(h.T).T)


# One width (4) and one rank (2) throughout, and each model built once: every test then reuses
# the same few compiled eager ops.
@functools.cache
def _mlp():
    return eqx.nn.MLP(4, 4, 4, 2, key=KEY)


@functools.cache
def _cnn():
    return CNN(KEY)


@functools.cache
def _attention():
    return Attention(eqx.nn.MultiheadAttention(2, 4, key=KEY))


@functools.cache
def _tagger():
    k1, k2, k3 = jax.random.split(KEY, 3)
    return Tagger(
        eqx.nn.Embedding(10, 4, key=k1),
        eqx.nn.Conv1d(4, 4, 3, padding=1, key=k2),
        eqx.nn.Linear(4, 6, key=k3),
    )


MODELS = {"mlp": _mlp, "cnn": _cnn, "attention": _attention}


def _arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def _statics(tree):
    return [x for x in jax.tree.leaves(tree) if not eqx.is_array(x)]


@pytest.mark.parametrize("name", MODELS)
def test_fresh_adapter_merges_to_the_base_bit_for_bit(name):
    model = MODELS[name]()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING)
    frozen, lora = jaxlora.split(model, config, KEY)
    assert frozen is model
    merged = jaxlora.merge(frozen, lora, config)
    assert type(merged) is type(model)
    assert_trees_bitwise_equal(_arrays(merged), _arrays(model))
    # Static fields and non-array leaves (activations, dropout rates) come back as they came.
    assert all(a is b for a, b in zip(_statics(merged), _statics(model), strict=True))


def _lowrank(lora, path, x, scale):
    """``s·((x·A)·B)`` of the Linear at ``path`` of Θ."""
    return scale * ((x @ lora[path]["lora_a"]) @ lora[path]["lora_b"])


def test_merged_mlp_is_the_factored_forward_and_unmerges():
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    merged = jaxlora.merge(frozen, lora, config)
    x = jax.random.normal(jax.random.key(1), (4,))
    h, scale = x, config.scale_for("layers/0", 2)
    for i, layer in enumerate(model.layers):
        h = layer(h) + scale * ((h @ lora["layers"][i]["lora_a"]) @ lora["layers"][i]["lora_b"])
        h = jax.nn.relu(h) if i < len(model.layers) - 1 else h
    np.testing.assert_allclose(merged(x), h, rtol=1e-5, atol=1e-6)
    assert not np.allclose(merged(x), model(x))
    assert_trees_close(_arrays(jaxlora.unmerge(merged, lora, config)), _arrays(model), atol=1e-6)


def test_merged_conv_is_the_factored_forward():
    """A conv's A is a conv ``(…window, Cin, r)``, its B a 1×1 conv ``(r, Cout)``."""
    model = _cnn()
    config = jaxlora.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    a, b = lora["conv"]["lora_a"], lora["conv"]["lora_b"]
    assert a.shape == (3, 3, 4, 2) and b.shape == (2, 4)
    merged = jaxlora.merge(frozen, lora, config)
    x = jax.random.normal(jax.random.key(1), (4, 5, 5))
    down = eqx.nn.Conv2d(4, 2, 3, padding=1, use_bias=False, key=KEY)
    down = eqx.tree_at(lambda c: c.weight, down, a.transpose(3, 2, 0, 1))
    up = jnp.einsum("rhw,ro->ohw", down(x), b)
    want = model.conv(x) + config.scale_for("conv", 2) * up
    np.testing.assert_allclose(merged.conv(x), want, rtol=1e-5, atol=1e-5)
    assert_trees_close(_arrays(jaxlora.unmerge(merged, lora, config)), _arrays(model), atol=1e-6)


def test_merged_attention_adapts_each_projection_out_in():
    model = _attention()
    config = jaxlora.LoraConfig(r=2, target_modules=["query_proj", "value_proj"])
    config = jaxlora.LoraConfig(**{**config.to_dict(), "init_lora_weights": False})
    frozen, lora = jaxlora.split(model, config, KEY)
    assert sorted(lora["attn"]) == ["query_proj", "value_proj"]
    merged = jaxlora.merge(frozen, lora, config)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    scale = config.scale_for("attn/query_proj", 2)
    for name in ("query_proj", "value_proj"):
        base = getattr(model.attn, name)
        want = jax.vmap(base)(x) + _lowrank(lora["attn"], name, x, scale)
        np.testing.assert_allclose(jax.vmap(getattr(merged.attn, name))(x), want, atol=1e-5)
    np.testing.assert_array_equal(merged.attn.key_proj.weight, model.attn.key_proj.weight)
    assert merged(x).shape == (3, 4) and not np.allclose(merged(x), model(x))


def test_count_is_the_hand_count():
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING)
    counted = jaxlora.count(*jaxlora.split(model, config, KEY))
    base = sum(x.size for x in jax.tree.leaves(_arrays(model)))
    adapter = 3 * 2 * (4 + 4)  # r·(in + out) per Linear
    assert (counted.total, counted.trainable) == (base + adapter, adapter)
    assert [m.path for m in counted.modules] == ["layers/0", "layers/1", "layers/2"]


def test_eqx_partition_arrays_split_and_merge():
    model = _mlp()
    arrays, static = eqx.partition(model, eqx.is_array)
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    _, lora = jaxlora.split(arrays, config, KEY)
    merged_arrays = jaxlora.merge(arrays, lora, config)
    assert jax.tree.structure(merged_arrays) == jax.tree.structure(arrays)
    x = jnp.ones(4)
    np.testing.assert_array_equal(
        eqx.combine(merged_arrays, static)(x), jaxlora.merge(model, lora, config)(x)
    )
    assert jaxlora.count(arrays, lora).total == jaxlora.count(model, lora).total


@pytest.mark.slow  # compiles a gradient
def test_filter_jit_and_filter_grad_reach_every_adapter_leaf():
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    x = jnp.ones(4)

    def loss(lora, frozen, x):
        return jnp.sum(jaxlora.merge(frozen, lora, config)(x) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(lora, frozen, x)
    assert_trees_close(grads, jax.grad(loss)(lora, frozen, x), rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_factored_equinox_model_equals_merged_in_output_and_gradient(name):
    """``jaxlora.factored`` runs an Equinox model itself (its weights (out, in), its activation
    functions passed through untraced), under ``eqx.filter_jit``, as merging it would."""
    model = MODELS[name]()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    shape = {"mlp": (4,), "cnn": (4, 6, 6), "attention": (3, 4)}[name]
    x = jax.random.normal(KEY, shape)  # distinct tokens: attention's q and k get a gradient
    run = jaxlora.factored(lambda m, x: m(x), config)

    def factored(lora):
        return jnp.sum(run(frozen, lora, x) ** 2)

    def merged(lora):
        return jnp.sum(jaxlora.merge(frozen, lora, config)(x) ** 2)

    got = eqx.filter_jit(jax.value_and_grad(factored))(lora)
    # Gradients reach ~250 (attention): float32 sums in another order differ by ~1e-5 there.
    assert_trees_close(got, jax.value_and_grad(merged)(lora), rtol=1e-5, atol=1e-4)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(got[1]))


@pytest.mark.slow  # compiles a gradient
def test_factored_equinox_linears_form_no_weight_sized_value():
    """A vmapped Linear's ``W·x`` (the weight on the left, stored (out, in)) takes the fused path:
    the compiled gradient holds no ``W + s·A·B``, no ΔW, no transposed copy of W, no gradient of
    W: the weights' shapes appear only as its parameters."""
    model = eqx.nn.MLP(3, 5, 6, 1, key=KEY)  # weights (6, 3) and (5, 6)
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING)
    frozen, lora = jaxlora.split(model, config, KEY)
    arrays, static = eqx.partition(frozen, eqx.is_array)
    run = jaxlora.factored(lambda m, x: jax.vmap(m)(x), config)
    x = jnp.ones((7, 3))
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda t: run(frozen, t, x))(lora))  # fused
    grad = jax.jit(jax.grad(lambda t, a: jnp.sum(run(eqx.combine(a, static), t, x))))
    hlo = grad.lower(lora, arrays).compile().as_text()
    formed = re.findall(r"= f32\[(6,3|3,6|5,6|6,5)\]\S* (\w+)", hlo)
    assert sorted(formed) == [("5,6", "parameter"), ("6,3", "parameter")], formed


class _Block(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k1)
        self.mlp = eqx.nn.MLP(8, 8, 16, 1, key=k2)
        self.norm = eqx.nn.LayerNorm(8)

    def __call__(self, x):
        x = x + self.attn(x, x, x)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(x))


class _ScannedStack(eqx.Module):
    """Equinox's scan-over-layers idiom: blocks made by ``filter_vmap``, run by ``lax.scan``."""

    blocks: _Block

    def __init__(self, key):
        self.blocks = eqx.filter_vmap(_Block)(jax.random.split(key, 3))

    def __call__(self, x):
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        return jax.lax.scan(lambda x, layer: (eqx.combine(layer, static)(x), None), x, dynamic)[0]


@pytest.mark.slow  # compiles a scanned transformer's gradient twice
def test_factored_scanned_transformer_equals_merged():
    model = _ScannedStack(KEY)
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    assert lora["blocks"]["mlp"]["layers"][0]["lora_a"].shape == (3, 8, 2)  # stacked: "soi"
    x = jax.random.normal(jax.random.key(2), (5, 8))
    run = jaxlora.factored(lambda m, x: m(x), config)
    got = eqx.filter_jit(jax.value_and_grad(lambda t: jnp.sum(run(frozen, t, x) ** 2)))(lora)
    merged = eqx.filter_jit(
        jax.value_and_grad(lambda t: jnp.sum(jaxlora.merge(frozen, t, config)(x) ** 2))
    )(lora)
    assert_trees_close(got[0], merged[0], rtol=1e-5)  # a loss of ~2e3, float32 sums
    for g, want in zip(jax.tree.leaves(got[1]), jax.tree.leaves(merged[1]), strict=True):
        # Gradients reach ~4e3 here: float32 sums in another order, at the leaf's own scale.
        np.testing.assert_allclose(g, want, rtol=0, atol=5e-5 * float(jnp.abs(want).max()))
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(got[1]))
    fresh = jaxlora.split(model, jaxlora.LoraConfig(r=2, target_modules=EVERYTHING), KEY)[1]
    base = eqx.filter_jit(lambda m, x: m(x))(model, x)
    # B = 0 adds exact zeros to the base product, computed as the layer computes it (W·x, the
    # weight on the left): bit for bit, op by op and jitted.
    with jax.disable_jit():
        assert_trees_bitwise_equal(run(frozen, fresh, x), model(x))
    assert_trees_bitwise_equal(eqx.filter_jit(run)(frozen, fresh, x), base)


def test_stacked_layers_and_infer_layouts():
    """``eqx.filter_vmap``-made layers: their leading axis is a stack axis ``s``."""
    layers = _mlp().layers  # three Linear(4, 4), stacked as `eqx.filter_vmap` would make them
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    model = {"blocks": stack, "tagger": _tagger()}
    assert jaxlora.infer_layouts(_tagger()) == {"conv": "oiw", "emb": "io", "head": "oi"}
    assert set(jaxlora.infer_layouts(_mlp()).values()) == {"oi"}
    config = jaxlora.LoraConfig(r=2, target_modules=["blocks"], init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    a, b = lora["blocks"]["lora_a"], lora["blocks"]["lora_b"]
    assert a.shape == (3, 4, 2) and b.shape == (3, 2, 4)
    merged = jaxlora.merge(frozen, lora, config)["blocks"].weight
    want = stack.weight + config.scale_for("blocks", 2) * jnp.einsum("sir,sro->soi", a, b)
    np.testing.assert_allclose(merged, want, atol=1e-6)


def test_stacked_norm_layers_are_no_targets():
    """A stacked LayerNorm's ``weight`` is 2-D (layers, features), a Linear's shape; it is still
    a per-feature scale, so no rule (not even ``.*``) adapts it, in Θ or in PEFT files."""
    norms = eqx.filter_vmap(lambda _: eqx.nn.LayerNorm(4))(jnp.arange(3))
    model = {"norm": norms, "rms": eqx.nn.RMSNorm(4), "head": eqx.nn.Linear(4, 4, key=KEY)}
    assert norms.weight.shape == (3, 4)
    everything = jaxlora.LoraConfig(target_modules=".*")
    assert [t.path for t in jaxlora.find_targets(model, everything)] == ["head"]
    with pytest.raises(ValueError, match="no module matched"):
        jaxlora.split(model, jaxlora.LoraConfig(target_modules=["norm"]), KEY)


def test_peft_files_round_trip_with_pytorch_shapes(tmp_path):
    model = _tagger()
    config = jaxlora.LoraConfig(
        r=2, target_modules=["emb", "conv", "head"], init_lora_weights=False, bias="lora_only"
    )
    frozen, lora = jaxlora.split(model, config, KEY)
    jaxlora.save_peft(tmp_path, lora, config, frozen)
    from safetensors.numpy import load_file

    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    prefix = "base_model.model."
    assert shapes[prefix + "head.lora_A.weight"] == (2, 4)  # (r, in)
    assert shapes[prefix + "head.lora_B.weight"] == (6, 2)  # (out, r)
    assert shapes[prefix + "conv.lora_A.weight"] == (2, 4, 3)  # (r, Cin, k)
    assert shapes[prefix + "conv.lora_B.weight"] == (4, 2, 1)
    assert shapes[prefix + "emb.lora_embedding_A"] == (2, 10)  # (r, vocab)
    assert shapes[prefix + "emb.lora_embedding_B"] == (4, 2)  # (dim, r)
    assert shapes[prefix + "head.base_layer.bias"] == (6,)
    loaded, loaded_config = jaxlora.load_peft(tmp_path, frozen)
    assert_trees_bitwise_equal(loaded, lora)
    assert sorted(loaded_config.target_modules) == sorted(config.target_modules)


def test_checkpoint_save_and_restore(tmp_path):
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    optimizer = optax.sgd(0.1)
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 3, lora, config, opt_state=optimizer.init(lora))
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        restored = checkpoint.restore(manager, frozen, optimizer=optimizer)
    assert restored.step == 3 and restored.config == config
    assert_trees_bitwise_equal(restored.lora, lora)


def test_combine_partition_and_freeze():
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, bias="all")
    frozen, lora = jaxlora.split(model, config, KEY)
    combined = jaxlora.combine(frozen, lora)
    assert sorted(combined["layers"][0]) == ["bias", "lora_a", "lora_b", "weight"]
    back_frozen, back_lora = jaxlora.partition(combined, config)
    assert_trees_bitwise_equal(back_lora, lora)
    mask = jaxlora.trainable_mask(combined, config)
    assert mask["layers"][0] == {"bias": True, "lora_a": True, "lora_b": True, "weight": False}
    state = jaxlora.freeze(optax.adam(1e-3), config).init(combined)
    sizes = sum(x.size for x in jax.tree.leaves(state) if jnp.ndim(x))
    assert sizes == 2 * sum(x.size for x in jax.tree.leaves(lora))


def test_adapter_bank_weighted_sum_and_stack():
    model = _mlp()
    config = jaxlora.LoraConfig(r=2, target_modules=EVERYTHING, init_lora_weights=False)
    one, two = (jaxlora.split(model, config, jax.random.key(k))[1] for k in (1, 2))
    bank = jaxlora.AdapterBank(model)
    bank.add("one", one, config)
    x = jnp.ones(4)
    np.testing.assert_array_equal(bank.params("one")(x), jaxlora.merge(model, one, config)(x))
    summed, summed_config = adapters.add_weighted(model, [(one, config, 1.0), (two, config, 1.0)])
    want = jaxlora.merge(jaxlora.merge(model, one, config), two, config)
    got = jaxlora.merge(model, summed, summed_config)
    assert_trees_close(_arrays(got), _arrays(want), atol=1e-5)
    stacked = adapters.stack([one, two])
    assert stacked["layers"][0]["lora_a"].shape == (2, 4, 2)


@pytest.mark.slow  # a subprocess
def test_jaxlora_works_without_equinox():
    """Equinox is an optional extra: jaxlora never imports it, and runs where it is missing."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]  # this checkout's jaxlora

    code = (  # one process: the import, then the calls with `import equinox` raising ImportError
        "import sys, jax, jax.numpy as jnp, jaxlora\n"
        "print('equinox' in sys.modules); sys.modules['equinox'] = None\n"
        "params = {'q': {'kernel': jnp.ones((2, 2))}, 'fc': {'weight': jnp.ones((3, 2))}}\n"
        "config = jaxlora.LoraConfig(r=1, target_modules=['q', 'fc'])\n"
        "frozen, lora = jaxlora.split(params, config, jax.random.key(0))\n"
        "jaxlora.merge(frozen, lora, config); print(jaxlora.count(frozen, lora).trainable)\n"
    )
    run = dict(capture_output=True, text=True, check=False, cwd=root)
    done = subprocess.run([sys.executable, "-c", code], **run)
    assert done.returncode == 0, done.stderr
    # Importing jaxlora left equinox unimported, and nothing the calls reach imports it.
    assert done.stdout.split() == ["False", str(2 + 2 + 2 + 3)], done.stderr


def test_dora_on_equinox_weights():
    model = _tagger()
    config = jaxlora.LoraConfig(r=2, target_modules=["head", "conv"])
    frozen, lora = jaxlora.split(model, config, KEY, variant="dora")
    assert lora["head"]["lora_magnitude"].shape == (6,)  # one per output feature
    merged = jaxlora.merge(frozen, lora, config)
    assert_trees_close(_arrays(merged), _arrays(model), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"DoRA adapts dense and conv kernels; `emb` is an embed"):
        jaxlora.split(model, jaxlora.LoraConfig(target_modules=["emb"]), KEY, variant="dora")


class Named(eqx.Module):
    value: eqx.nn.Linear  # the name of an NNX Variable's array attribute, here a real field


def test_a_field_named_value_keeps_its_path():
    model = Named(_mlp().layers[0])
    config = jaxlora.LoraConfig(r=2, target_modules=["value"], init_lora_weights=False)
    frozen, lora = jaxlora.split(model, config, KEY)
    assert [t.path for t in jaxlora.find_targets(model, config)] == ["value"]
    assert sorted(lora["value"]) == ["lora_a", "lora_b"]
    assert jaxlora.merge(frozen, lora, config).value.weight.shape == (4, 4)
