"""Hugging Face Llama-family checkpoints in and merged models out, checked against transformers."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora.models import llama
from jaxlora.models.hf import export as hf_export
from jaxlora.models.hf import llama as hf_llama
from jaxlora.models.hf import llama_export as hf_llama_export

pytestmark = pytest.mark.slow

COMMON = dict(
    vocab_size=48,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
FAMILIES = {
    # Llama 3.x RoPE scaling, with every optional bias.
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, attention_bias=True, mlp_bias=True, rope_scaling=LLAMA3_ROPE, rope_theta=5e5
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=3, head_dim=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    # Layer 1 of 2 with sliding-window attention.
    "qwen3": lambda: transformers.Qwen3Config(
        **COMMON, head_dim=8, use_sliding_window=True, sliding_window=3, max_window_layers=1
    ),
}
IDS = np.random.RandomState(0).randint(0, COMMON["vocab_size"], (2, 7))


def _torch_model(hf_config, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases, norms away from 1
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _jax_logits(config, params, ids=IDS):
    # Jitted: op by op, every call compiles each op of the model anew.
    return np.asarray(jax.jit(llama.LlamaForCausalLM(config).apply)({"params": params}, ids))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (directory, torch model)."""
    out = {}
    for name, make in FAMILIES.items():
        model = _torch_model(make())
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (str(directory), model)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(saved, family):
    directory, model = saved[family]
    config, params = hf_llama.load_hf(directory)
    assert config == hf_llama.config_from_hf(model.config.to_dict())
    np.testing.assert_allclose(_jax_logits(config, params), _torch_logits(model), atol=1e-4)
    # The family's feature is really in use: switching it off changes the logits.
    plain = {"llama": dict(rope_scaling=None), "mistral": dict(sliding_window=None)}
    plain["qwen3"] = plain["mistral"]
    if family in plain:
        off = _jax_logits(dataclasses.replace(config, **plain[family]), params)
        assert np.abs(off - _torch_logits(model)).max() > 1e-3


def test_sharded_checkpoint_with_index(saved, tmp_path):
    _, model = saved["llama"]
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) >= 3
    config, params = hf_llama.load_hf(tmp_path, progress=True)
    np.testing.assert_allclose(_jax_logits(config, params), _torch_logits(model), atol=1e-4)


def test_bf16_stays_bf16_and_dtype_overrides(tmp_path):
    model = _torch_model(FAMILIES["qwen2"](), torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = hf_llama.load_hf(tmp_path)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    torch_embed = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"], np.float32),
                                  torch_embed)  # fmt: skip
    _, wide = hf_llama.load_hf(tmp_path, dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(wide)} == {jnp.dtype(jnp.float32)}
    hf_export.save_hf(tmp_path / "out", config, params)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _copy_with(directory, tmp_path, change):
    target = tmp_path / "changed"
    shutil.copytree(directory, target)
    tensors = load_file(str(target / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_bad_checkpoints_name_the_tensor(saved, tmp_path):
    directory, _ = saved["qwen3"]
    name = "model.layers.1.self_attn.k_norm.weight"
    missing = _copy_with(directory, tmp_path / "a", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\]"):
        hf_llama.load_hf(missing)
    extra = _copy_with(directory, tmp_path / "b", lambda t: t.update(stray=np.ones(2, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensors \['stray'\]"):
        hf_llama.load_hf(extra)

    def widen(t):
        t[name] = np.ones(9, np.float32)

    with pytest.raises(ValueError, match=rf"`{name}` .* shape \(9,\), expected \(8,\)"):
        hf_llama.load_hf(_copy_with(directory, tmp_path / "c", widen))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2'; supported: \('llama', 'mistral', 'qwen2'"):
        hf_llama.load_hf(odd)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_llama.load_hf(tmp_path / "nowhere")


def test_load_into_a_mesh(saved):
    directory, model = saved["llama"]
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    rules = {r"(q|k|v)_proj/kernel": PartitionSpec(None, "model")}
    config, params = hf_llama.load_hf(directory, mesh=mesh, shardings=rules)
    kernel = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec(None, "model"))
    assert params["norm"]["scale"].sharding == NamedSharding(mesh, PartitionSpec())
    np.testing.assert_allclose(_jax_logits(config, params), _torch_logits(model), atol=1e-4)
    with pytest.raises(ValueError, match="pass the `mesh`"):
        hf_llama.load_hf(directory, shardings=rules)


def test_load_sharded_over_eight_host_devices(saved):
    directory, model = saved["llama"]
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from jaxlora.models import llama
        from jaxlora.models.hf import llama as hf_llama
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        rules = lambda path, shape: P(None, "model") if path.endswith("kernel") else P()
        config, params = hf_llama.load_hf({directory!r}, mesh=mesh, shardings=rules)
        kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert len(kernel.addressable_shards) == 8, kernel.sharding
        assert kernel.addressable_shards[0].data.shape == (16, 6), kernel.addressable_shards
        ids = np.load({str(directory) + "/ids.npy"!r})
        logits = jax.jit(llama.LlamaForCausalLM(config).apply)({{"params": params}}, ids)
        np.save({str(directory) + "/logits.npy"!r}, np.asarray(logits))
    """)
    np.save(os.path.join(directory, "ids.npy"), IDS)
    eight_devices = "--xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {eight_devices}"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(os.path.join(directory, "logits.npy"))
    np.testing.assert_allclose(logits, _torch_logits(model), atol=1e-4)


def _adapter(config, params):
    lora_config = jaxlora.LoraConfig(
        r=2, lora_alpha=4, target_modules=r".*(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)"
    )
    frozen, lora = jaxlora.split(params, lora_config, jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    model = llama.LlamaForCausalLM(config)
    adapted = np.asarray(
        jax.jit(lambda lora: jaxlora.apply(model, frozen, lora, lora_config, IDS))(lora)
    )
    assert np.abs(adapted - _jax_logits(config, params)).max() > 1e-3  # the adapter acts
    return frozen, lora, lora_config, adapted


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_merged_export_loads_in_transformers(saved, family, tmp_path):
    directory, _ = saved[family]
    config, params = hf_llama.load_hf(directory)
    frozen, lora, lora_config, adapted = _adapter(config, params)
    hf_export.save_hf_merged(tmp_path, config, frozen, lora, lora_config, max_shard_size="8KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert type(loaded).__name__ == hf_llama_export.ARCHITECTURES[family]
    np.testing.assert_allclose(_torch_logits(loaded.float().eval()), adapted, atol=1e-4)
    # And back again: the exported directory loads into the same config.
    assert hf_llama.load_hf(tmp_path)[0] == config


def test_peft_adapter_loads_with_peft(saved, tmp_path):
    import peft

    directory, model = saved["qwen2"]
    config, params = hf_llama.load_hf(directory)
    frozen, lora, lora_config, adapted = _adapter(config, params)
    jaxlora.save_peft(
        tmp_path,
        lora,
        lora_config,
        frozen,
        module_name=hf_llama.peft_module_name,
    )
    peft_model = peft.PeftModel.from_pretrained(_torch_model(FAMILIES["qwen2"]()), tmp_path)
    np.testing.assert_allclose(_torch_logits(peft_model.eval()), adapted, atol=1e-4)
    # And back: PEFT's names map onto the same Flax paths.
    back, _ = jaxlora.load_peft(tmp_path, frozen, module_name=hf_llama.peft_module_name)
    jax.tree.map(np.testing.assert_array_equal, back, lora)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_round_trip(saved, family):
    config = hf_llama.config_from_hf(saved[family][1].config.to_dict())
    assert hf_llama.config_from_hf(hf_export.config_to_hf(config)) == config
    assert hf_export.model_type(config) == family


def test_gemma_model_types_go_to_the_gemma_loader(tmp_path, monkeypatch):
    from jaxlora.models.hf import gemma as gemma_weights

    calls = []

    def fake(directory, **options):
        calls.append((directory, options))
        return "config", {}

    monkeypatch.setattr(gemma_weights, "load_hf_gemma", fake)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert hf_llama.load_hf(tmp_path, dtype=jnp.bfloat16) == ("config", {})
    options = dict(mesh=None, shardings=None, dtype=jnp.bfloat16, progress=False)
    assert calls == [(tmp_path, options)]


def test_bad_exports_name_the_problem(saved, tmp_path):
    config, params = hf_llama.load_hf(saved["qwen2"][0])
    with pytest.raises(ValueError, match="`max_shard_size`"):
        hf_export.save_hf(tmp_path, config, params, max_shard_size="lots")
    broken = {**params, "norm": {}}
    with pytest.raises(ValueError, match=r"missing \['norm/scale'\]"):
        hf_export.save_hf(tmp_path, config, broken)
    with pytest.raises(ValueError, match="rope_interleaved"):
        hf_export.save_hf(tmp_path, llama.LlamaConfig(), params)
    with pytest.raises(ValueError, match="`hf_config` describes"):
        wrong = {**hf_export.config_to_hf(config), "vocab_size": 7}
        hf_export.save_hf(tmp_path, config, params, hf_config=wrong)
    assert not os.listdir(tmp_path)
