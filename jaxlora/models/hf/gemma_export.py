"""Hugging Face ``config.json`` for a Gemma 1/2/3 text model: the inverse of
:func:`jaxlora.models.hf.gemma.config_from_hf`.

:func:`jaxlora.models.hf.export.save_hf` and :func:`~jaxlora.models.hf.export.save_hf_merged`
write a :class:`~jaxlora.models.gemma.GemmaConfig` model with it; the tensor names, their
``(out, in)`` layouts and the norms (stored as Hugging Face stores them: the ``weight`` of
``x̂ · (1 + weight)``) come from :func:`jaxlora.models.hf.gemma.expected_tensors`, read
backwards.

:func:`model_type` picks the generation from the features: ``qk_norm`` is Gemma 3
(``"gemma3_text"``), sandwich norms without it Gemma 2 (``"gemma2"``), neither Gemma 1
(``"gemma"``); a mix no generation has is refused rather than written as something that computes
differently.

Example:
    >>> from jaxlora.models.gemma import FULL, SLIDING, GemmaConfig
    >>> cfg = GemmaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=2,
    ...                   num_heads=2, num_kv_heads=1, head_dim=4, sandwich_norms=True,
    ...                   query_pre_attn_scalar=4.0, sliding_window=2,
    ...                   layer_types=(SLIDING, FULL))
    >>> doc = config_to_hf(cfg)
    >>> doc["model_type"], doc["architectures"], doc["layer_types"][0]
    ('gemma2', ['Gemma2ForCausalLM'], 'sliding_attention')
"""

from __future__ import annotations

from typing import Any

from jaxlora.models.gemma.config import FULL, SLIDING, GemmaConfig

__all__ = ["config_to_hf", "model_type"]

_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _refuse(config: GemmaConfig, kind: str, reason: str) -> None:
    raise ValueError(
        f"`config` cannot be written as a Hugging Face {kind!r} model: {reason}; no Hugging Face "
        f"Gemma generation computes this mix of features ({config}), so change the config"
    )


def model_type(config: GemmaConfig) -> str:
    """The Hugging Face ``model_type`` that has exactly ``config``'s features.

    Example:
        >>> model_type(GemmaConfig())
        'gemma'

    Raises:
        TypeError: If ``config`` is not a :class:`~jaxlora.models.gemma.GemmaConfig`.
        ValueError: For a mix of features no Gemma generation has (q/k norms without sandwich
            norms; Gemma 1 with soft-capping, sliding layers, a local RoPE, exact gelu or a
            ``query_pre_attn_scalar`` other than ``head_dim``; Gemma 2 with a local RoPE).
    """
    if not isinstance(config, GemmaConfig):
        raise TypeError(f"`config` must be a GemmaConfig, got {type(config).__name__}")
    theta, factor = config.rope_local_theta, config.rope_local_factor
    local = (
        config.rope_theta if theta is None else theta,
        config.rope_factor if factor is None else factor,
    )
    own_local = local != (config.rope_theta, config.rope_factor)
    if config.qk_norm:
        if not config.sandwich_norms:
            _refuse(config, "gemma3_text", "q/k norms need `sandwich_norms=True`")
        return "gemma3_text"
    if config.sandwich_norms:
        if own_local:
            _refuse(config, "gemma2", "a local RoPE needs Gemma 3's `qk_norm=True`")
        return "gemma2"
    problems = {
        "soft-capping": config.attn_logit_softcapping or config.final_logit_softcapping,
        "sliding layers": SLIDING in (config.layer_types or ()),
        "a local RoPE": own_local,
        "exact gelu": not config.gelu_approximate,
        "a `query_pre_attn_scalar`": config.query_pre_attn_scalar
        not in (None, float(config.head_dim)),
    }
    found = [name for name, present in problems.items() if present]
    if found:
        _refuse(
            config,
            "gemma",
            f"Gemma 1 has no {', '.join(found)} (Gemma 2 has: `sandwich_norms=True`)",
        )
    return "gemma"


def _rope(theta: float, factor: float) -> dict[str, Any]:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def _rope_keys(config: GemmaConfig, kind: str) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) and the older keys, which must agree."""
    full = _rope(config.rope_theta, config.rope_factor)
    scaling = (
        None if config.rope_factor == 1.0 else {"rope_type": "linear", "factor": full["factor"]}
    )
    keys = {"rope_theta": config.rope_theta, "rope_scaling": scaling}
    if kind != "gemma3_text":
        return {**keys, "rope_parameters": full}
    theta = config.rope_theta if config.rope_local_theta is None else config.rope_local_theta
    factor = config.rope_factor if config.rope_local_factor is None else config.rope_local_factor
    if factor != 1.0:
        raise ValueError(
            f"`config.rope_local_factor` is {factor}; Hugging Face's Gemma 3 scales only the "
            "full-attention RoPE: set `rope_local_factor=1.0`"
        )
    return {
        **keys,
        "rope_local_base_freq": theta,
        "rope_parameters": {FULL: full, SLIDING: _rope(theta, 1.0)},
    }


def config_to_hf(config: GemmaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict for ``config`` (``model_type`` from :func:`model_type`).

    ``query_pre_attn_scalar=None`` is written as ``head_dim`` (what the model uses; an integer, as
    transformers requires), a Gemma 2/3
    model without sliding layers gets ``sliding_window = max_position_embeddings``.

    Example:
        >>> doc = config_to_hf(GemmaConfig(), dtype="bfloat16")
        >>> doc["model_type"], doc["hidden_act"], doc["torch_dtype"]
        ('gemma', 'gelu_pytorch_tanh', 'bfloat16')

    Raises:
        TypeError / ValueError: As :func:`model_type`; also for a scaled local RoPE (Gemma 3) or a
            ``query_pre_attn_scalar`` that is not a whole number.
    """
    kind = model_type(config)
    activation = "gelu_pytorch_tanh" if config.gelu_approximate else "gelu"
    document = {
        "architectures": [_ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "attention_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
        **_rope_keys(config, kind),
    }
    if kind == "gemma":
        return {**document, "hidden_act": activation}
    scalar = (
        config.head_dim if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar
    )
    if scalar != int(scalar):
        raise ValueError(
            f"`config.query_pre_attn_scalar` is {scalar}; Hugging Face's Gemma configs hold an "
            "integer: round it, or keep the model in jaxlora"
        )
    types = config.layer_types or (FULL,) * config.num_layers
    return {
        **document,
        "hidden_activation": activation,
        "query_pre_attn_scalar": int(scalar),
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window or config.max_position_embeddings,
        "layer_types": list(types),
        "use_bidirectional_attention": False,
    }
