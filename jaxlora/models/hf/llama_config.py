"""A :class:`~jaxlora.models.llama.LlamaConfig` from a Hugging Face Llama-family ``config.json``.

:func:`config_from_hf` reads ``model_type`` ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` (see
:data:`LLAMA_MODEL_TYPES`): sizes, biases, q/k norms, RoPE (default or Llama 3's scaling, from
``rope_parameters`` or the older ``rope_theta`` / ``rope_scaling``) and sliding windows.
:func:`jaxlora.models.hf.llama_export.config_to_hf` is the inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.rope import Llama3RopeScaling

__all__ = ["LLAMA_MODEL_TYPES", "config_from_hf"]

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
