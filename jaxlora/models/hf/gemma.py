"""Hugging Face Gemma 1/2/3 checkpoints for :mod:`jaxlora.models.gemma`: the weights.

:func:`config_from_hf` (from :mod:`jaxlora.models.hf.gemma_config`) reads a ``config.json``.
:func:`load_hf_gemma` reads the safetensors beside it (single file or sharded) through
:func:`jaxlora.models.hf.checkpoint.read_checkpoint`, tensor by tensor into the requested
shardings: every tensor the model needs must be present with its shape and no other may be, or the
error names it (a multimodal Gemma 3's vision tower and projector are skipped). Linear weights
``(out, in)`` become Dense kernels ``(in, out)``; norm weights are kept as they are (the model
multiplies by ``1 + scale``). :func:`jaxlora.models.hf.export.save_hf` (with
:mod:`jaxlora.models.hf.gemma_export`) writes such a directory back, LoRA merged in or not.

Example (a checkpoint that ``transformers`` saved; not run here)::

    config, params = load_hf_gemma("path/to/gemma-2-2b", dtype=jnp.bfloat16, progress=True)
    logits = GemmaForCausalLM(config).apply({"params": params}, ids)
"""

from __future__ import annotations

import os
import re
from typing import Any

from jax.sharding import Mesh
from jax.typing import DTypeLike

from jaxlora._src import validate
from jaxlora.models.gemma.config import GemmaConfig
from jaxlora.models.hf.arguments import check_load_args, check_weight_dtype
from jaxlora.models.hf.checkpoint import (
    Shardings,
    TensorSpec,
    read_checkpoint,
    read_config,
    tensor_files,
)
from jaxlora.models.hf.gemma_config import config_from_hf as config_from_hf

__all__ = ["config_from_hf", "expected_tensors", "load_hf_gemma", "peft_module_name"]

# A multimodal Gemma 3 nests its text decoder (transformers >= 4.52 first, then older files) and
# keeps a vision tower and projector beside it.
_MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.")
_VISION = r"^(model\.)?(vision_tower|multi_modal_projector)\."


def expected_tensors(config: GemmaConfig, prefix: str = "model.") -> dict[str, TensorSpec]:
    """Hugging Face tensor name -> :class:`~jaxlora.models.hf.checkpoint.TensorSpec`.

    Args:
        config: The model's config.
        prefix: What precedes ``layers.{i}``, ``embed_tokens`` and ``norm`` in the names:
            ``"model."`` for ``Gemma*ForCausalLM``; a multimodal Gemma 3 checkpoint keeps its text
            model under ``"model.language_model."`` (older: ``"language_model.model."``).

    Example:
        >>> cfg = GemmaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1,
        ...                   num_heads=2, num_kv_heads=1, head_dim=4)
        >>> spec = expected_tensors(cfg)["model.layers.0.self_attn.q_proj.weight"]
        >>> spec.path, spec.shape, spec.target_shape
        (('layers_0', 'self_attn', 'q_proj', 'kernel'), (8, 4), (4, 8))
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    linears = {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (config.intermediate_size, hidden),
        "mlp.up_proj": (config.intermediate_size, hidden),
        "mlp.down_proj": (hidden, config.intermediate_size),
    }
    norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden}
    if config.sandwich_norms:
        norms |= {"pre_feedforward_layernorm": hidden, "post_feedforward_layernorm": hidden}
    if config.qk_norm:
        norms |= {"self_attn.q_norm": config.head_dim, "self_attn.k_norm": config.head_dim}
    expected = {
        f"{prefix}embed_tokens.weight": TensorSpec(("embed_tokens", "embedding"), (vocab, hidden)),
        f"{prefix}norm.weight": TensorSpec(("norm", "scale"), (hidden,)),
    }
    if not config.tie_word_embeddings:
        head = "language_model.lm_head.weight" if prefix.startswith("language_model.") else ""
        expected[head or "lm_head.weight"] = TensorSpec.linear(
            ("lm_head", "kernel"), (vocab, hidden)
        )
    for i in range(config.num_layers):
        for name, shape in linears.items():
            path = (f"layers_{i}", *name.split("."), "kernel")
            expected[f"{prefix}layers.{i}.{name}.weight"] = TensorSpec.linear(path, shape)
        for name, size in norms.items():
            path = (f"layers_{i}", *name.split("."), "scale")
            expected[f"{prefix}layers.{i}.{name}.weight"] = TensorSpec(path, (size,))
    return expected


def peft_module_name(path: str, index: tuple[int, ...] = ()) -> str:
    """The ``Gemma*ForCausalLM`` module name of a Flax module path: ``module_name`` for
    :func:`jaxlora.save_peft` / :func:`jaxlora.load_peft`, so adapters move to and from PEFT.

    Example:
        >>> peft_module_name("layers_3/self_attn/q_proj")
        'model.layers.3.self_attn.q_proj'

    Raises:
        ValueError: For a stacked module (``index`` non-empty): Gemma has one module per layer.
    """
    validate.string("path", path, nonempty=False)
    validate.int_tuple("index", index)
    if index:
        raise ValueError(f"`{path}` is stacked (index {index}); GemmaForCausalLM has none")
    block = re.fullmatch(r"layers_(\d+)/(.+)", path)
    if block:
        return f"model.layers.{block[1]}.{block[2].replace('/', '.')}"
    return path if path == "lm_head" else "model." + path.replace("/", ".")


def _text_prefix(directory: str | os.PathLike[str], model_type: Any) -> str:
    """Where the text model's tensors live: ``model.`` unless a multimodal Gemma 3 nests them."""
    if model_type != "gemma3":
        return "model."
    names = tensor_files(directory)
    for prefix in _MULTIMODAL_PREFIXES:
        if f"{prefix}embed_tokens.weight" in names:
            return prefix
    raise ValueError(
        f"the Gemma 3 checkpoint in `{os.fspath(directory)}` has no text embedding under any of "
        f"{list(_MULTIMODAL_PREFIXES)}"
    )


def load_hf_gemma(
    directory: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    shardings: Shardings | None = None,
    dtype: DTypeLike | None = None,
    progress: bool = False,
) -> tuple[GemmaConfig, dict[str, Any]]:
    """Loads a Hugging Face Gemma 1/2/3 checkpoint directory (``config.json`` + safetensors).

    A multimodal Gemma 3 (``model_type`` ``"gemma3"``) gives its text decoder; the vision tower and
    projector are skipped.

    Args:
        directory: A ``save_pretrained`` or Hub snapshot directory (single file or sharded).
        mesh, shardings: Where each tensor goes, as
            :func:`~jaxlora.models.hf.checkpoint.read_checkpoint` places them.
        dtype: Cast every tensor to it, a floating dtype (an integer one is a TypeError); None
            keeps the stored dtypes.
        progress: Show a progress bar while reading.

    Returns:
        ``(config, params)`` for ``GemmaForCausalLM(config).apply({"params": params}, ids)``.

    Raises:
        FileNotFoundError: If ``config.json`` or the weights are missing.
        ValueError: If the config is not a supported Gemma, or a tensor is missing, unexpected or
            of the wrong shape (the error names it).
        TypeError: If ``dtype`` is not floating, or a weight is stored as integers (the error
            names the tensor and its file).
    """
    check_load_args(directory, mesh, shardings, progress)
    check_weight_dtype(dtype)  # before anything is read
    document = read_config(directory)
    config = config_from_hf(document)
    prefix = _text_prefix(directory, document.get("model_type"))
    params = read_checkpoint(
        directory,
        expected_tensors(config, prefix),
        mesh=mesh,
        shardings=shardings,
        dtype=dtype,
        progress=progress,
        ignore=_VISION if prefix != "model." else None,
    )
    return config, params
