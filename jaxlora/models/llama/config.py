"""The hyper-parameters of :class:`~jaxlora.models.llama.LlamaForCausalLM`: :class:`LlamaConfig`.

Example:
    >>> LlamaConfig(num_heads=4, num_kv_heads=2).head_dim
    64
"""

from __future__ import annotations

import dataclasses

from jaxlora._src import validate
from jaxlora.models.llama.rope import Llama3RopeScaling

__all__ = ["LlamaConfig"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder; the defaults are those of SmolLM2-135M(-Instruct).

    The family features (all off by default) are: ``qkv_bias`` (biases on q/k/v, Qwen2; with
    ``o_proj_bias`` Llama's ``attention_bias``), ``mlp_bias``, ``qk_norm`` (RMSNorm over each
    head of q and k before RoPE, Qwen3), ``rope_scaling`` (Llama 3.x) and ``sliding_window``
    (query p sees keys p - window < j <= p, Mistral), which the layers listed in
    ``full_attention_layers`` do not use (Qwen's per-layer ``layer_types``).
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_interleaved: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int = 1
    eos_token_id: int = 2
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        validate.dataclass_fields(self, nonnegative=("bos_token_id", "eos_token_id"))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise validate.fail_type(
                "rope_scaling", "a Llama3RopeScaling or None", self.rope_scaling
            )
        if not isinstance(self.full_attention_layers, tuple):
            raise validate.fail_type(
                "full_attention_layers", "a tuple of layer indices", self.full_attention_layers
            )
        for layer in self.full_attention_layers:
            validate.integer("full_attention_layers", layer, minimum=0, maximum=self.num_layers - 1)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"`sliding_window` must be None or >= 1, got {self.sliding_window}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")
