"""Hugging Face Llama-family checkpoints (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) for
:class:`~jaxlora.models.llama.LlamaForCausalLM`.

:func:`load_hf` reads a local checkpoint directory (``config.json`` + safetensors, single or
sharded), picking the loader by ``config.json``'s ``model_type``; :func:`load_hf_llama` is the
Llama-family loader, :func:`config_from_hf` the config translation (from
:mod:`jaxlora.models.hf.llama_config`) and :func:`expected_tensors` the name map (Hugging Face
tensor -> Flax path, shape and transpose). Loading goes through
:func:`jaxlora.models.hf.checkpoint.read_checkpoint`: tensor by tensor, straight into the target
shardings.

Example (a checkpoint that ``transformers`` saved; not run here)::

    config, params = load_hf("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16, progress=True)
    logits = LlamaForCausalLM(config).apply({"params": params}, ids)
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from jax.sharding import Mesh
from jax.typing import DTypeLike

from jaxlora._src import validate
from jaxlora.models.hf.arguments import check_load_args, check_weight_dtype
from jaxlora.models.hf.checkpoint import (
    Shardings,
    TensorSpec,
    read_checkpoint,
    read_config,
)
from jaxlora.models.hf.llama_config import LLAMA_MODEL_TYPES as LLAMA_MODEL_TYPES
from jaxlora.models.hf.llama_config import config_from_hf as config_from_hf
from jaxlora.models.llama.config import LlamaConfig

__all__ = [
    "GEMMA_MODEL_TYPES",
    "LLAMA_MODEL_TYPES",
    "config_from_hf",
    "expected_tensors",
    "load_hf",
    "load_hf_llama",
    "peft_module_name",
]

#: Handed to ``jaxlora.models.hf.gemma.load_hf_gemma`` when that module exists.
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
#: Checkpoint tensors that are derived buffers, not weights (older Llama checkpoints keep them).
IGNORED = r"rotary_emb\.inv_freq$"


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
    validate.string("path", path, nonempty=False)
    validate.int_tuple("index", index)
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
        mesh, shardings: where each tensor goes, see :mod:`jaxlora.models.hf.checkpoint`
            (e.g. ``{r"q_proj/kernel": PartitionSpec(None, "model")}``).
        dtype: cast every weight to it, a floating dtype (an integer one is a TypeError);
            ``None`` keeps the stored dtype (bf16 stays bf16).
        progress: show a ``tqdm`` progress bar.

    Raises:
        FileNotFoundError: for a missing ``config.json`` or weights file.
        ValueError: for an unsupported config, or naming each missing, unexpected or misshapen
            tensor.
        TypeError: for a ``dtype`` that is not floating, or an integer tensor stored under a
            weight's name (naming the tensor and its file).
    """
    check_load_args(directory, mesh, shardings, progress)
    check_weight_dtype(dtype)  # before anything is read
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
        module = importlib.import_module("jaxlora.models.hf.gemma")
    except ModuleNotFoundError as err:
        if err.name != "jaxlora.models.hf.gemma":
            raise
        module = None
    loader = getattr(module, "load_hf_gemma", None)
    if loader is None:
        raise ValueError(
            "Gemma checkpoints need `jaxlora.models.hf.gemma.load_hf_gemma`, which this "
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
    to ``jaxlora.models.hf.gemma.load_hf_gemma``.

    Raises:
        FileNotFoundError: when ``directory`` has no ``config.json``.
        ValueError: for any other ``model_type`` (listing the supported ones), and as the loader.
    """
    check_load_args(directory, mesh, shardings, progress)
    check_weight_dtype(dtype)  # before anything is read
    kind = read_config(directory).get("model_type")
    if kind in LLAMA_MODEL_TYPES:
        loader = load_hf_llama
    elif kind in GEMMA_MODEL_TYPES:
        loader = _gemma_loader()
    else:
        raise ValueError(
            f"config.json in `{os.fspath(directory)}` has `model_type` {kind!r}; supported: "
            f"{LLAMA_MODEL_TYPES + GEMMA_MODEL_TYPES}"
        )
    return loader(directory, mesh=mesh, shardings=shardings, dtype=dtype, progress=progress)
