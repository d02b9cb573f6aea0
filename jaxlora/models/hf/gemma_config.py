"""A Gemma 1/2/3 :class:`~jaxlora.models.gemma.config.GemmaConfig` from a Hugging Face
``config.json``.

:func:`config_from_hf` reads ``model_type`` ``"gemma"``, ``"gemma2"``, ``"gemma3_text"``, or a
multimodal ``"gemma3"`` whose ``text_config`` is used, filling the keys a file leaves out with
``transformers``' defaults for that model type (Hub Gemma 3 configs omit many); both the older
``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` keys and transformers 5's
``rope_parameters`` are understood. :func:`jaxlora.models.hf.gemma_export.config_to_hf` is the
inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlora.models.gemma.config import FULL, SLIDING, GemmaConfig

__all__ = ["config_from_hf"]

_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
# transformers' class defaults for the keys a config.json may omit (Gemma3 Hub configs omit many).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
    },
    "gemma2": {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "sliding_window_pattern": 2,
    },
    "gemma3_text": {
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "sliding_window_pattern": 6,
    },
}
_COMMON = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


def _rope(params: Any, theta: float, key: str) -> tuple[float, float]:
    """``(theta, factor)`` from a rope dict (``rope_parameters`` entry or old ``rope_scaling``)."""
    if params is None:
        return theta, 1.0
    if not isinstance(params, Mapping):
        raise ValueError(f"`{key}` must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(
            f"`{key}` has rope_type {kind!r}; only 'default' and 'linear' RoPE are supported"
        )
    factor = float(params["factor"]) if kind == "linear" else 1.0
    return float(params.get("rope_theta", theta)), factor


def _ropes(
    cfg: Mapping[str, Any], model_type: str
) -> tuple[tuple[float, float], tuple[float | None, float | None]]:
    """``((theta, factor), (local_theta, local_factor))``; the local pair is Gemma 3's only."""
    rope = cfg.get("rope_parameters")
    if model_type == "gemma3_text":
        rope = rope or {}
        full = _rope(
            rope.get(FULL, cfg.get("rope_scaling")), float(cfg["rope_theta"]), "rope_parameters"
        )
        local = _rope(rope.get(SLIDING), float(cfg["rope_local_base_freq"]), "rope_parameters")
        return full, local
    key = "rope_parameters" if rope else "rope_scaling"
    return _rope(rope or cfg.get(key), float(cfg["rope_theta"]), key), (None, None)


def _layer_types(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    if model_type == "gemma":
        return (FULL,) * num_layers
    types = cfg.get("layer_types")
    if types is None:
        pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern")))
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
    return tuple(types)


def _activation(cfg: Mapping[str, Any], model_type: str) -> bool:
    """Whether the GeGLU uses the tanh approximation."""
    if model_type == "gemma":
        # Gemma 1's legacy "gelu" meant the tanh approximation; transformers maps it so.
        name = cfg.get("hidden_activation") or cfg["hidden_act"]
        allowed = {"gelu": True, "gelu_pytorch_tanh": True}
    else:
        name = cfg["hidden_activation"]
        allowed = {"gelu": False, "gelu_pytorch_tanh": True}
    if name not in allowed:
        raise ValueError(
            f"config.json's activation {name!r} is not supported by jaxlora's Gemma model; "
            f"expected one of {sorted(allowed)}"
        )
    return allowed[name]


def config_from_hf(config_json: Mapping[str, Any]) -> GemmaConfig:
    """Builds a :class:`~jaxlora.models.gemma.GemmaConfig` from a Hugging Face ``config.json`` dict.

    Example:
        >>> cfg = config_from_hf({"model_type": "gemma2", "num_hidden_layers": 4})
        >>> cfg.layer_types[:2], cfg.attn_logit_softcapping, cfg.query_pre_attn_scalar
        (('sliding_attention', 'full_attention'), 50.0, 256.0)

    Raises:
        TypeError: If ``config_json`` is not a mapping.
        ValueError: If ``model_type`` is not a Gemma 1/2/3 text model, or the config asks for
            something the model lacks (bidirectional attention, biases, RoPE other than default
            or linear, activations other than gelu).
    """
    if not isinstance(config_json, Mapping):
        raise TypeError(
            f"`config_json` must be the dict of a config.json, got {type(config_json).__name__}"
        )
    model_type = config_json.get("model_type")
    if model_type == "gemma3":
        top = {k: config_json[k] for k in ("tie_word_embeddings",) if k in config_json}
        config_json = {"model_type": "gemma3_text", **top, **(config_json.get("text_config") or {})}
        model_type = config_json["model_type"]
    if model_type not in _DEFAULTS:
        raise ValueError(
            f"`model_type` {model_type!r} is not a Gemma text model; expected one of {_MODEL_TYPES}"
        )
    cfg = {**_COMMON, **_DEFAULTS[model_type], **config_json}
    for flag in ("use_bidirectional_attention", "attention_bias"):
        if cfg.get(flag):
            raise ValueError(
                f"config.json sets `{flag}`, which jaxlora's Gemma model does not support"
            )
    num_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    (theta, factor), local = _ropes(cfg, model_type)
    gemma1 = model_type == "gemma"
    softcap = {
        key: None if gemma1 or cfg.get(key) is None else float(cfg[key])
        for key in ("attn_logit_softcapping", "final_logit_softcapping")
    }
    eos = cfg["eos_token_id"]
    return GemmaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg["num_key_value_heads"]),
        head_dim=head_dim,
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=theta,
        rope_factor=factor,
        rope_local_theta=local[0],
        rope_local_factor=local[1],
        query_pre_attn_scalar=None if gemma1 else float(cfg["query_pre_attn_scalar"]),
        attn_logit_softcapping=softcap["attn_logit_softcapping"],
        final_logit_softcapping=softcap["final_logit_softcapping"],
        sliding_window=None if gemma1 else int(cfg["sliding_window"]),
        layer_types=_layer_types(cfg, model_type, num_layers),
        sandwich_norms=not gemma1,
        qk_norm=model_type == "gemma3_text",
        gelu_approximate=_activation(cfg, model_type),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        bos_token_id=int(cfg["bos_token_id"]),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        pad_token_id=int(cfg.get("pad_token_id") or 0),
    )
