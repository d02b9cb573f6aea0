"""Inputs that used to be accepted in silence or refused with the wrong reason (issue 24): each
is now a clear error naming the argument, or a documented behaviour that a test pins down."""

from __future__ import annotations

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jaxlora
from jaxlora import adapters, loraplus, quant, variants
from jaxlora._src.variants import base as variants_base
from jaxlora.models import BertConfig, BertEncoder, generate, left_pad, llama, save_hf
from jaxlora.models.hf import gemma as hf_gemma
from jaxlora.models.hf import llama as hf_llama
from jaxlora.models.hf import llama_export

FROZEN = {"up": {"kernel": jnp.ones((4, 6))}, "down": {"kernel": jnp.ones((6, 4))}}
CONFIG = jaxlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)


# --- bfloat16 adapters (np.issubdtype calls ml_dtypes' bfloat16 not floating) ----------------


def test_bfloat16_peft_round_trip_is_exact(tmp_path):
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), FROZEN)
    config = jaxlora.LoraConfig(
        r=2, target_modules=["up", "down"], init_lora_weights=False, dtype="bfloat16"
    )
    # Hand-made factors (distinct values, no random compile); split would make the same tree.
    shapes = {"up": ((4, 2), (2, 6)), "down": ((6, 2), (2, 4))}
    lora = {
        name: {
            "lora_a": jnp.asarray(np.arange(np.prod(a)).reshape(a) / 8, jnp.bfloat16),
            "lora_b": jnp.asarray(-np.arange(np.prod(b)).reshape(b) / 8, jnp.bfloat16),
        }
        for name, (a, b) in shapes.items()
    }
    jaxlora.save_peft(tmp_path / "bf16", lora, config, frozen)
    back, _ = jaxlora.load_peft(tmp_path / "bf16", frozen, dtype="bfloat16")
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        assert got.dtype == jnp.bfloat16
        assert bool((got == want).all())


# --- token ids against the vocabulary ------------------------------------------------------------

TINY_LLAMA = llama.LlamaConfig(
    vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama():
    # Abstract params: every refusal happens before anything is computed.
    model = llama.LlamaForCausalLM(TINY_LLAMA)
    ids = jnp.ones((1, 2), jnp.int32)
    return model, jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": [[1, 32]]}, r"`prompts` holds token id 32 at position \(0, 1\).*\[0, 32\)"),
        ({"prompts": np.array([[1, 2], [3, 99]])}, r"`prompts` .* 99 at position \(1, 1\)"),
        ({"prompts": [[1, 2], [-1]]}, r"`prompts\[1\]` holds token id -1 at position \(0,\)"),
        ({"prompts": [[1, 2**32 + 3]]}, r"`prompts\[0\]` .* 4294967299"),  # not wrapped to 3
        ({"prompts": [[1]], "pad_id": 32}, r"`pad_id` holds token id 32.*\[0, 32\)"),
        ({"prompts": [[1]], "stop_tokens": [5, 40]}, r"`stop_tokens` .* 40 at position \(1,\)"),
    ],
)
def test_generate_refuses_token_ids_outside_the_vocabulary(tiny_llama, kwargs, match):
    model, params = tiny_llama
    with pytest.raises(ValueError, match=match):
        generate(model, params, max_new_tokens=1, **kwargs)


def test_models_refuse_concrete_token_ids_outside_the_vocabulary(tiny_llama):
    model, params = tiny_llama
    with pytest.raises(ValueError, match=r"`input_ids` holds token id -3 at position \(0, 1\)"):
        model.apply({"params": params}, np.array([[0, -3]]))
    with pytest.raises(ValueError, match=r"`prompt_ids` holds token id 77 .*\[0, 32\)"):
        llama.generate(params, TINY_LLAMA, [1, 77], 1)
    with pytest.raises(ValueError, match=r"`eos_id` holds token id 32"):
        llama.generate(params, TINY_LLAMA, [1, 2], 1, eos_id=32)
    bert = BertEncoder(BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=1,
                                  intermediate_size=4, max_position_embeddings=4))  # fmt: skip
    bert_params = jax.eval_shape(bert.init, jax.random.key(0), jnp.ones((1, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"`input_ids` holds token id 10"):
        bert.apply(bert_params, np.array([[1, 10]]))
    with pytest.raises(ValueError, match=r"`token_type_ids` holds token id 2"):
        bert.apply(bert_params, np.array([[1, 2]]), token_type_ids=np.array([[0, 2]]))
    with pytest.raises(ValueError, match=r"`max_position_embeddings` \(4\)"):
        bert.apply(bert_params, np.ones((1, 5), np.int32))


def test_left_pad_refuses_negative_ids_and_pad_id():
    with pytest.raises(ValueError, match=r"`prompts\[0\]` holds token id -2"):
        left_pad([[-2, 1]])
    with pytest.raises(ValueError, match=r"`pad_id` holds token id -1"):
        left_pad([[2, 1]], pad_id=-1)
    with pytest.raises(TypeError, match=r"`pad_id` must be an int"):
        left_pad([[2, 1]], pad_id=0.5)  # type: ignore[arg-type]


def test_traced_token_ids_are_not_checked_under_jit(tiny_llama):
    # Documented: under the caller's jit the ids are tracers; only concrete ids are checked.
    model, params = tiny_llama
    logits = jax.eval_shape(model.apply, {"params": params}, jnp.array([[1, 99]]))
    assert logits.shape == (1, 2, 32)


# --- Hugging Face checkpoints: weights are floating point -----------------------------------------


def _hf_directory(path, change=None):
    """A tiny Llama checkpoint written with numpy alone (no torch): config.json + safetensors."""
    hf_config = dataclasses.replace(TINY_LLAMA, rope_interleaved=False)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(llama_export.config_to_hf(hf_config)))
    tensors = {name: np.full(spec.shape, 0.25, np.float32)
               for name, spec in hf_llama.expected_tensors(hf_config).items()}  # fmt: skip
    if change:
        change(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.parametrize("dtype", [jnp.int8, "int32", bool, "bf16-typo"])
def test_load_hf_refuses_a_dtype_that_is_not_floating(tmp_path, dtype):
    # Refused before any file is read: the directory need not even exist.
    for loader in (hf_llama.load_hf, hf_llama.load_hf_llama, hf_gemma.load_hf_gemma):
        with pytest.raises(TypeError, match=r"`dtype` must be None .* floating dtype"):
            loader(tmp_path / "missing", dtype=dtype)


def test_load_hf_refuses_an_integer_tensor_under_a_weights_name(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"

    def quantised(tensors):
        tensors[name] = tensors[name].astype(np.int8)

    directory = _hf_directory(tmp_path / "int8", quantised)
    with pytest.raises(TypeError, match=rf"`{re.escape(name)}` in `.*model.safetensors` is int8"):
        hf_llama.load_hf(directory)
    config, params = hf_llama.load_hf(_hf_directory(tmp_path / "ok"), dtype=jnp.bfloat16)
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert float(params["layers_0"]["self_attn"]["q_proj"]["kernel"][0, 0]) == 0.25


# --- apply(mutable=...) names a collection the model has ----------------------------------------


class _NnxNormed(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.fc(x))


class _LinenNormed(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(4, name="fc")(x))


MUTABLE_CONFIG = jaxlora.LoraConfig(r=1, target_modules=["fc"])


def test_nnx_mutable_typo_is_refused_with_the_collections_that_exist():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NnxNormed(nnx.Rngs(0))))
    x = jnp.ones((2, 3))

    def run(mutable):  # traced only: the check reads which variables exist, not their values
        def call(state):
            frozen, lora = jaxlora.split(state, MUTABLE_CONFIG, jax.random.key(1))
            return jaxlora.apply(graphdef, frozen, lora, MUTABLE_CONFIG, x, mutable=mutable)

        return jax.eval_shape(call, state)

    for typo in ("batchstats", ["batch_stats", "cache"], nnx.Intermediate):
        with pytest.raises(ValueError, match=r"`mutable` entry .* selects no variable.*"
                                             r"'batch_stats' \(nnx.BatchStat\)"):  # fmt: skip
            run(typo)
    assert sorted(run("batch_stats")[1]["bn"]) == ["mean", "var"]


def test_linen_mutable_typo_is_refused_with_the_collections_that_exist():
    model = _LinenNormed()
    x = jnp.ones((2, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, False))
    others = {"batch_stats": variables["batch_stats"]}

    def run(mutable):  # traced only: the check needs the structure of what comes back
        def call(params, others):
            frozen, lora = jaxlora.split(params, MUTABLE_CONFIG, jax.random.key(1))
            return jaxlora.apply(model, frozen, lora, MUTABLE_CONFIG, x, False, variables=others,
                                 mutable=mutable)  # fmt: skip

        return jax.eval_shape(call, variables["params"], others)

    with pytest.raises(ValueError, match=r"`mutable` names \['batchstats'\].*"
                                         r"\['batch_stats', 'params'\]"):  # fmt: skip
        run(["batchstats"])
    assert set(run(["batch_stats"])[1]) == {"batch_stats"}


# --- the variants registry ----------------------------------------------------------------------


def _variant(name="probe", extra_leaves=("lora_probe",), fusable=False):
    # Reuses DoRA's behaviour; only the declaration is under test.
    return type("Probe", (type(variants.DORA),), {
        "name": name, "extra_leaves": extra_leaves, "fusable": fusable})()  # fmt: skip


@pytest.mark.parametrize(
    ("declaration", "error", "match"),
    [
        ({"extra_leaves": ("lora_b",)}, ValueError, r"holds \['lora_b'\], a leaf name that LoRA"),
        ({"extra_leaves": ("lora_a", "x")}, ValueError, r"holds \['lora_a'\]"),
        ({"extra_leaves": ("bias",)}, ValueError, r"holds \['bias'\].*reserved"),
        ({"extra_leaves": ("kernel",)}, ValueError, r"holds \['kernel'\]"),
        ({"extra_leaves": ("embedding",)}, ValueError, r"holds \['embedding'\]"),
        ({"extra_leaves": "scale"}, TypeError, r"`extra_leaves` .* got the str 'scale'"),
        ({"extra_leaves": ("g", "g")}, ValueError, r"`extra_leaves` .* repeats \['g'\]"),
        ({"extra_leaves": ("g", 3)}, TypeError, r"`extra_leaves` .* tuple of non-empty str"),
        ({"extra_leaves": ("",)}, TypeError, r"`extra_leaves`"),
        ({"name": ""}, TypeError, r"`name` of variant Probe must be a non-empty str"),
        ({"name": 5}, TypeError, r"`name` of variant Probe"),
        ({"fusable": "yes"}, TypeError, r"`fusable` .* must be a bool"),
    ],
)
def test_register_refuses_bad_declarations(declaration, error, match):
    with pytest.raises(error, match=match):
        variants.register(_variant(**declaration))
    assert "lora_probe" not in variants_base.adapter_leaves()  # nothing was added


def test_register_refuses_a_class_and_builtins_stay():
    with pytest.raises(TypeError, match=r"`variant` must be a Variant instance.*pass Probe\(\)"):
        variants.register(type(_variant()))
    for name in ("lora", "dora"):
        with pytest.raises(ValueError, match=rf"`name` '{name}' is a built-in variant"):
            variants.unregister(name)
    variants.register(_variant())
    variants.unregister("probe")


# --- LoRA+ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": float("nan")}, ValueError, r"`ratio` .* got nan"),
        ({"ratio": float("inf")}, ValueError, r"`ratio` .* got inf"),
        ({"ratio": 0.0}, ValueError, r"`ratio` .* >= 1, got 0.0"),
        ({"ratio": -2}, ValueError, r"`ratio`"),
        ({"ratio": "16"}, TypeError, r"`ratio`"),
        ({"ratio": np.float32(4)}, None, None),  # numpy scalars are numbers
        ({"lr": float("nan")}, ValueError, r"`lr` must be a finite number > 0, got nan"),
        ({"lr": -1e-3}, ValueError, r"`lr` must be a finite number > 0"),
        ({"lr": 0.0}, ValueError, r"`lr` must be a finite number > 0"),
        ({"lr": "1e-3"}, TypeError, r"`lr` must be a number or an optax schedule"),
        ({"lr": None}, TypeError, r"`lr`"),
        ({"embedding_lr": float("inf")}, ValueError, r"`embedding_lr` .* >= 0, got inf"),
        ({"embedding_lr": 0.0}, None, None),  # freezes the embedding factors
        ({"embedding_paths": "emb"}, TypeError, r"`embedding_paths` .* got the str 'emb'"),
        ({"embedding_paths": [3]}, TypeError, r"`embedding_paths` entries must be"),
        ({"embedding_paths": 5}, TypeError, r"`embedding_paths` must be a sequence"),
    ],
)
def test_loraplus_refuses_bad_rates_and_paths(kwargs, error, match):
    call = {"optimizer_factory": optax.sgd, "lr": 0.1, **kwargs}
    if error is None:
        assert loraplus.loraplus(**call) is not None
        return
    with pytest.raises(error, match=match):
        loraplus.loraplus(**call)


def test_loraplus_embedding_path_must_name_an_adapted_module():
    lora = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))},
            "embed": {"lora_a": jnp.ones((9, 2)), "lora_b": jnp.ones((2, 4))}}  # fmt: skip
    opt = loraplus.loraplus(optax.sgd, 0.1, embedding_paths=["emb"])
    with pytest.raises(ValueError, match=r"`embedding_paths` entries \['emb'\] name no adapted "
                                         r"module.*\['embed', 'q'\]"):  # fmt: skip
        opt.init(lora)
    with pytest.raises(TypeError, match="`optimizer_factory` must be a function"):
        loraplus.loraplus(optax.sgd(0.1), 0.1)  # type: ignore[arg-type]


# --- apply_mixed: an index out of range --------------------------------------------------------


def test_apply_mixed_out_of_range_index_is_an_error_eagerly_and_nan_rows_under_jit():
    model = nn.Dense(2, name="d")
    x = jnp.arange(8.0).reshape(4, 2)
    params = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
    config = jaxlora.LoraConfig(r=1, target_modules=".*", init_lora_weights=False)
    members = [{"lora_a": jnp.full((2, 1), k + 1.0), "lora_b": jnp.ones((1, 2))} for k in range(2)]
    stacked = adapters.stack(members)
    for index in ([0, 2, 1, 0], [0, -1, 1, 0]):
        with pytest.raises(ValueError, match=r"`index` must lie in \[0, 2\).*`index\[1\]`"):
            adapters.apply_mixed(model, params, stacked, config, jnp.array(index), x)
    # Under jit the index cannot be checked: rows out of range (2, and -1: never wrapped to the
    # last adapter) come out NaN, the others as eagerly.
    mixed = jax.jit(adapters.apply_mixed, static_argnums=(0, 3))
    got = np.asarray(mixed(model, params, stacked, config, jnp.array([0, 2, -1, 1]), x))
    assert np.isnan(got[1:3]).all() and np.isfinite(got[[0, 3]]).all()
    want = np.asarray(mixed(model, params, stacked, config, jnp.array([0, 0, 1, 1]), x))
    np.testing.assert_array_equal(got[[0, 3]], want[[0, 3]])  # the same program: bit for bit


def test_save_hf_refuses_an_integer_weight_before_writing(tmp_path):
    hf_config = dataclasses.replace(TINY_LLAMA, rope_interleaved=False)
    params = {}
    for spec in hf_llama.expected_tensors(hf_config).values():
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = np.zeros(spec.target_shape, np.float32)
    params["layers_0"]["mlp"]["up_proj"]["kernel"] = np.zeros((8, 16), np.int8)
    with pytest.raises(TypeError, match=r"`params` leaf layers_0/mlp/up_proj/kernel .* int8"):
        save_hf(tmp_path / "out", hf_config, params)
    assert not (tmp_path / "out").exists()


def test_cache_and_dequantize_dtypes_must_be_floating(tiny_llama):
    model, params = tiny_llama
    with pytest.raises(TypeError, match=r"`cache_dtype` must be a floating dtype .* got int8"):
        generate(model, params, [[1]], max_new_tokens=1, cache_dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype"):
        llama.init_cache(TINY_LLAMA, 1, 4, "int32")
    leaf = jax.eval_shape(lambda: quant.quantize_kernel(jnp.ones((16, 16)), "int8"))
    for call in (lambda: quant.dequantize(leaf, jnp.int8),
                 lambda: quant.dequantize_tree({"k": leaf}, "bool")):  # fmt: skip
        with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype"):
            call()


def test_bert_state_dict_refuses_an_integer_weight():
    from jaxlora.models.bert import weights

    state = {"embeddings.word_embeddings.weight": np.zeros((10, 4), np.int8)}
    with pytest.raises(TypeError, match=r"`embeddings.word_embeddings.weight` in here is int8"):
        weights.hf_state_dict_to_params(state, {}, source="here")
