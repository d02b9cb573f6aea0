"""Hugging Face Llama-family checkpoints (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) for
:class:`~jaxlora.models.llama.LlamaForCausalLM`.

:func:`load_hf` reads a local checkpoint directory (``config.json`` + safetensors, single or
sharded), picking the loader by ``config.json``'s ``model_type``; :func:`load_hf_llama` is the
Llama-family loader, :func:`config_from_hf` the config translation and :func:`expected_tensors`
the name map (Hugging Face tensor -> Flax path, shape and transpose). Loading goes through
:func:`jaxlora.models.hf_checkpoint.read_checkpoint`: tensor by tensor, straight into the target
shardings.

Example (a checkpoint that ``transformers`` saved; not run here)::

    config, params = load_hf("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16, progress=True)
    logits = LlamaForCausalLM(config).apply({"params": params}, ids)
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh
from jax.typing import DTypeLike

from jaxlora.models.hf_checkpoint import Shardings, TensorSpec, read_checkpoint, read_config
from jaxlora.models.llama import Llama3RopeScaling, LlamaConfig

__all__ = [
    "GEMMA_MODEL_TYPES",
    "LLAMA_MODEL_TYPES",
    "config_from_hf",
    "expected_tensors",
    "load_hf",
    "load_hf_llama",
    "peft_module_name",
]

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Handed to ``jaxlora.models.gemma_weights.load_hf_gemma`` when that module exists.
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
#: Checkpoint tensors that are derived buffers, not weights (older Llama checkpoints keep them).
IGNORED = r"rotary_emb\.inv_freq$"


def _get(document: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = document.get(key, default)
    return default if value is None else value


def _require(document: Mapping[str, Any], key: str) -> Any:
    if document.get(key) is None:
        raise ValueError(f"config.json has no `{key}`; it is needed for a Llama-family model")
    return document[key]


def _rope(document: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """``(theta, scaling)`` from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (earlier)."""
    params = dict(_get(document, "rope_scaling", {}))
    params.update(_get(document, "rope_parameters", {}))
    theta = float(_get(params, "rope_theta", _get(document, "rope_theta", 10000.0)))
    kind = _get(params, "rope_type", _get(params, "type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(
        f"config.json's RoPE type {kind!r} is not supported; supported: 'default', 'llama3'"
    )


def _sliding(document: Mapping[str, Any], kind: str, layers: int) -> dict[str, Any]:
    window = document.get("sliding_window")
    if kind == "mistral":
        return {"sliding_window": None if window is None else int(window)}
    if kind in ("qwen2", "qwen3") and document.get("use_sliding_window") and window is not None:
        types = document.get("layer_types")
        if types is None:
            start = int(_get(document, "max_window_layers", layers))
            types = ["full_attention" if i < start else "sliding_attention" for i in range(layers)]
        full = tuple(i for i, t in enumerate(types) if t != "sliding_attention")
        return {"sliding_window": int(window), "full_attention_layers": full}
    return {}


def _token_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def config_from_hf(document: Mapping[str, Any]) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Llama-family ``config.json`` (as a dict).

    ``bos_token_id`` / ``eos_token_id`` take the first of a list and keep
    :class:`LlamaConfig`'s defaults when absent (they only matter for generation).

    Raises:
        ValueError: for a ``model_type`` outside :data:`LLAMA_MODEL_TYPES`, a missing size, an
            activation other than SiLU, or an unsupported RoPE type.

    Example:
        >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "tie_word_embeddings": True})
        >>> cfg.head_dim, cfg.qkv_bias, cfg.o_proj_bias, cfg.rope_interleaved
        (4, True, False, False)
    """
    kind = document.get("model_type")
    if kind not in LLAMA_MODEL_TYPES:
        raise ValueError(
            f"config.json's `model_type` must be one of {LLAMA_MODEL_TYPES}, got {kind!r}"
        )
    act = _get(document, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json's `hidden_act` must be 'silu', got {act!r}")
    hidden = int(_require(document, "hidden_size"))
    heads = int(_require(document, "num_attention_heads"))
    layers = int(_require(document, "num_hidden_layers"))
    theta, scaling = _rope(document)
    bias = bool(_get(document, "attention_bias", False))
    defaults = LlamaConfig()
    return LlamaConfig(
        vocab_size=int(_require(document, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(document, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(document, "num_key_value_heads", heads)),
        head_dim=int(_get(document, "head_dim", hidden // heads)),
        rope_theta=theta,
        rope_interleaved=False,
        rms_norm_eps=float(_get(document, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_get(document, "tie_word_embeddings", False)),
        max_position_embeddings=int(_get(document, "max_position_embeddings", 2048)),
        bos_token_id=_token_id(document.get("bos_token_id"), defaults.bos_token_id),
        eos_token_id=_token_id(document.get("eos_token_id"), defaults.eos_token_id),
        qkv_bias=True if kind == "qwen2" else bias and kind != "mistral",
        o_proj_bias=bias and kind in ("llama", "qwen3"),
        mlp_bias=bool(_get(document, "mlp_bias", False)) and kind == "llama",
        qk_norm=kind == "qwen3",
        rope_scaling=scaling,
        **_sliding(document, kind, layers),
    )


def expected_tensors(config: LlamaConfig) -> dict[str, TensorSpec]:
    """Hugging Face tensor name -> :class:`TensorSpec` for every weight of ``config``'s model.

    Example:
        >>> specs = expected_tensors(LlamaConfig(num_layers=1))
        >>> specs["model.layers.0.self_attn.k_proj.weight"].path
        ('layers_0', 'self_attn', 'k_proj', 'kernel')
        >>> len(specs)
        11
    """
    c = config
    specs = {
        "model.embed_tokens.weight": TensorSpec(
            ("embed_tokens", "embedding"), (c.vocab_size, c.hidden_size)
        ),
        "model.norm.weight": TensorSpec(("norm", "scale"), (c.hidden_size,)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec.linear(
            ("lm_head", "kernel"), (c.vocab_size, c.hidden_size)
        )
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    modules = {
        "self_attn.q_proj": (q, c.hidden_size, c.qkv_bias),
        "self_attn.k_proj": (kv, c.hidden_size, c.qkv_bias),
        "self_attn.v_proj": (kv, c.hidden_size, c.qkv_bias),
        "self_attn.o_proj": (c.hidden_size, q, c.o_proj_bias),
        "mlp.gate_proj": (c.intermediate_size, c.hidden_size, c.mlp_bias),
        "mlp.up_proj": (c.intermediate_size, c.hidden_size, c.mlp_bias),
        "mlp.down_proj": (c.hidden_size, c.intermediate_size, c.mlp_bias),
    }
    for i in range(c.num_layers):
        hf, flax = f"model.layers.{i}.", f"layers_{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[f"{hf}{norm}.weight"] = TensorSpec((flax, norm, "scale"), (c.hidden_size,))
        for name, (out, inp, bias) in modules.items():
            path = (flax, *name.split("."))
            specs[f"{hf}{name}.weight"] = TensorSpec.linear((*path, "kernel"), (out, inp))
            if bias:
                specs[f"{hf}{name}.bias"] = TensorSpec((*path, "bias"), (out,))
        if c.qk_norm:
            for norm in ("q_norm", "k_norm"):
                specs[f"{hf}self_attn.{norm}.weight"] = TensorSpec(
                    (flax, "self_attn", norm, "scale"), (c.head_dim,)
                )
    return specs


def peft_module_name(path: str, index: tuple[int, ...] = ()) -> str:
    """The Hugging Face module name of a Flax module path, as ``module_name`` for
    :func:`jaxlora.save_peft` / :func:`jaxlora.load_peft` (PEFT adapters for ``transformers``).

    Example:
        >>> peft_module_name("layers_3/self_attn/q_proj", ())
        'model.layers.3.self_attn.q_proj'
        >>> peft_module_name("lm_head", ())
        'lm_head'

    Raises:
        ValueError: for a stacked module (``index`` non-empty): this model has one per layer.
    """
    if index:
        raise ValueError(f"`{path}` is stacked (index {index}); LlamaForCausalLM has none")
    block = re.fullmatch(r"layers_(\d+)/(.+)", path)
    if block:
        return f"model.layers.{block[1]}.{block[2].replace('/', '.')}"
    return path if path == "lm_head" else "model." + path.replace("/", ".")


def load_hf_llama(
    directory: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    shardings: Shardings | None = None,
    dtype: DTypeLike | None = None,
    progress: bool = False,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Llama-family checkpoint directory as ``(LlamaConfig, params)``.

    Args:
        directory: a local Hugging Face model directory (``config.json``, ``model.safetensors``
            or ``model.safetensors.index.json`` and its shards).
        mesh, shardings: where each tensor goes, see :mod:`jaxlora.models.hf_checkpoint`
            (e.g. ``{r"q_proj/kernel": PartitionSpec(None, "model")}``).
        dtype: cast every weight to it; ``None`` keeps the stored dtype (bf16 stays bf16).
        progress: show a ``tqdm`` progress bar.

    Raises:
        FileNotFoundError: for a missing ``config.json`` or weights file.
        ValueError: for an unsupported config, or naming each missing, unexpected or misshapen
            tensor.
    """
    config = config_from_hf(read_config(directory))
    params = read_checkpoint(
        directory,
        expected_tensors(config),
        mesh=mesh,
        shardings=shardings,
        dtype=dtype,
        progress=progress,
        ignore=IGNORED,
    )
    return config, params


def _gemma_loader() -> Any:
    try:
        module = importlib.import_module("jaxlora.models.gemma_weights")
    except ModuleNotFoundError as err:
        if err.name != "jaxlora.models.gemma_weights":
            raise
        module = None
    loader = getattr(module, "load_hf_gemma", None)
    if loader is None:
        raise ValueError(
            "Gemma checkpoints need `jaxlora.models.gemma_weights.load_hf_gemma`, which this "
            "installation of jaxlora does not have"
        )
    return loader


def load_hf(
    directory: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    shardings: Shardings | None = None,
    dtype: DTypeLike | None = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Loads a Hugging Face checkpoint directory as ``(config, params)`` by its ``model_type``.

    ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` give a :class:`LlamaConfig` (see
    :func:`load_hf_llama`, which has the arguments); ``gemma``, ``gemma2`` and ``gemma3_text`` go
    to ``jaxlora.models.gemma_weights.load_hf_gemma``.

    Raises:
        FileNotFoundError: when ``directory`` has no ``config.json``.
        ValueError: for any other ``model_type`` (listing the supported ones), and as the loader.
    """
    kind = read_config(directory).get("model_type")
    options = dict(mesh=mesh, shardings=shardings, dtype=dtype, progress=progress)
    if kind in LLAMA_MODEL_TYPES:
        return load_hf_llama(directory, **options)
    if kind in GEMMA_MODEL_TYPES:
        return _gemma_loader()(directory, **options)
    raise ValueError(
        f"config.json in `{os.fspath(directory)}` has `model_type` {kind!r}; supported: "
        f"{LLAMA_MODEL_TYPES + GEMMA_MODEL_TYPES}"
    )
