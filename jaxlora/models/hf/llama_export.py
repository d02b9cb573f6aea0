"""The ``config.json`` of a Llama-family :class:`~jaxlora.models.llama.config.LlamaConfig`.

:func:`model_type` picks the Hugging Face ``model_type`` (``llama``, ``mistral``, ``qwen2``,
``qwen3``) whose features are exactly the config's, :data:`ARCHITECTURES` its model class, and
:func:`config_to_hf` writes the dict, the inverse of
:func:`jaxlora.models.hf.llama_config.config_from_hf`.
:func:`jaxlora.models.hf.export.save_hf` writes it beside the weights.
"""

from __future__ import annotations

from typing import Any

from jaxlora.models.llama.config import LlamaConfig

__all__ = ["ARCHITECTURES", "config_to_hf", "model_type"]

#: ``model_type`` -> the ``transformers`` class name written in ``architectures``.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_type(config: LlamaConfig) -> str:
    """The Hugging Face ``model_type`` that has exactly ``config``'s features.

    Raises:
        ValueError: for the GGUF RoPE layout (``rope_interleaved=True``) or a mix of features no
            Hugging Face Llama-family model has.
    """
    if config.rope_interleaved:
        raise ValueError(
            "`config.rope_interleaved` is True (GGUF's q/k row order); Hugging Face needs the "
            "rotate-half layout: load the model with `hf_layout=True` / `rope_interleaved=False`"
        )
    windowed = config.sliding_window is not None
    biases = (config.qkv_bias, config.o_proj_bias, config.mlp_bias)
    if config.qk_norm and not config.mlp_bias and config.qkv_bias == config.o_proj_bias:
        return "qwen3"
    if biases == (True, False, False) and not config.qk_norm:
        return "qwen2"
    if windowed and not any(biases) and not config.full_attention_layers:
        return "mistral"
    if not windowed and config.qkv_bias == config.o_proj_bias and not config.qk_norm:
        return "llama"
    raise ValueError(
        f"no Hugging Face Llama-family model has this mix of features: {config}; pass the base "
        "model's own config.json as `hf_config`"
    )


def _rope(config: LlamaConfig) -> dict[str, Any]:
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta}
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling, "rope_parameters": parameters}


def _sliding(config: LlamaConfig, kind: str) -> dict[str, Any]:
    if kind == "mistral":
        return {"sliding_window": config.sliding_window}
    if kind == "llama" or config.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None} if kind != "llama" else {}
    types = [
        "full_attention" if i in config.full_attention_layers else "sliding_attention"
        for i in range(config.num_layers)
    ]
    return {
        "use_sliding_window": True,
        "sliding_window": config.sliding_window,
        "layer_types": types,
    }


def config_to_hf(config: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of a Llama-family ``config`` (``model_type``: :func:`model_type`).

    Example:
        >>> doc = config_to_hf(LlamaConfig(rope_interleaved=False, qkv_bias=True))
        >>> doc["model_type"], doc["architectures"]
        ('qwen2', ['Qwen2ForCausalLM'])
    """
    kind = model_type(config)
    document = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": dtype,
        **_rope(config),
        **_sliding(config, kind),
    }
    if kind in ("llama", "qwen3"):
        document["attention_bias"] = config.qkv_bias
    if kind == "llama":
        document["mlp_bias"] = config.mlp_bias
    return document
