"""The hyper-parameters of :class:`~jaxlora.models.gemma.GemmaForCausalLM`: :class:`GemmaConfig`.

:data:`FULL` and :data:`SLIDING` are the ``layer_types`` entries (Hugging Face's names).

Example:
    >>> cfg = GemmaConfig(num_layers=2, sliding_window=4, layer_types=(SLIDING, FULL),
    ...                   rope_local_theta=10.0)
    >>> cfg.is_sliding(0), cfg.rope(0), cfg.rope(1)
    (True, (10.0, 1.0), (10000.0, 1.0))
"""

from __future__ import annotations

import dataclasses

from jaxlora._src import validate

__all__ = ["FULL", "SLIDING", "GemmaConfig"]

#: ``layer_types`` entries, Hugging Face's names.
FULL = "full_attention"
SLIDING = "sliding_attention"


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters of a Gemma decoder; the defaults are Gemma 1 2B's.

    Gemma 2 and 3 set ``sandwich_norms``, ``query_pre_attn_scalar``, ``sliding_window`` and
    ``layer_types`` (Gemma 2 also the soft-caps, Gemma 3 ``qk_norm`` and the local RoPE).
    :func:`jaxlora.models.hf.gemma.config_from_hf` reads all of them from a ``config.json``.

    Attributes:
        rope_theta / rope_factor: RoPE base and linear scaling factor of full-attention layers
            (the inverse frequencies are divided by the factor).
        rope_local_theta / rope_local_factor: The same for sliding layers; ``None`` takes the
            full-attention value (Gemma 1/2 use one RoPE for all layers).
        query_pre_attn_scalar: Scores are multiplied by its ``-0.5`` power; ``None``: ``head_dim``.
        layer_types: One of :data:`FULL`, :data:`SLIDING` per layer; ``None``: all full.
        sandwich_norms: Gemma 2/3's extra norms around attention and the feed-forward.
        gelu_approximate: ``gelu`` with the tanh approximation (Hugging Face's
            ``gelu_pytorch_tanh``) or exact (``gelu`` in a Gemma 2/3 config).
    """

    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_local_theta: float | None = None
    rope_local_factor: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    sandwich_norms: bool = False
    qk_norm: bool = False
    gelu_approximate: bool = True
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        validate.dataclass_fields(self, nonnegative=TOKEN_IDS)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, tuple):
            raise TypeError(
                f"`layer_types` must be a tuple (the config is hashable), got "
                f"{type(self.layer_types).__name__}; pass tuple(layer_types)"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_layers` is "
                f"{self.num_layers}; give one per layer"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (FULL, SLIDING):
                raise ValueError(
                    f"`layer_types[{i}]` is {kind!r}; expected {FULL!r} or {SLIDING!r}"
                )
        if SLIDING in self.layer_types and (self.sliding_window or 0) < 1:
            raise ValueError(
                f"`layer_types` has {SLIDING!r} layers but `sliding_window` is "
                f"{self.sliding_window}; set a positive window"
            )

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends to a sliding window only."""
        validate.integer("layer", layer, minimum=0, maximum=self.num_layers - 1)
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> tuple[float, float]:
        """``(theta, factor)`` of layer ``layer``'s rotary embedding."""
        if self.is_sliding(layer):
            theta = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
            factor = self.rope_factor if self.rope_local_factor is None else self.rope_local_factor
            return theta, factor
        return self.rope_theta, self.rope_factor
