"""Reading a local Hugging Face checkpoint directory into a Flax ``params`` tree, tensor by tensor.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. A model family says what it expects as a mapping from Hugging Face
tensor name to :class:`TensorSpec` (Flax path, Hugging Face shape, how to turn one into the other);
:func:`read_checkpoint` then reads each tensor once with ``safetensors.safe_open``, converts it and
places it straight into its target sharding, so that at most one tensor is on the host at a time.
Every missing, unexpected or misshapen tensor is an error naming the tensor.

Shardings, when a ``mesh`` is given, come from ``shardings``: a callable ``(path, shape) ->
PartitionSpec | Sharding`` (``path`` the Flax path joined with ``/``), or a mapping from regular
expression to ``PartitionSpec`` where the first expression that ``re.search`` finds in the path wins
and a path no expression matches is replicated. Without a mesh each tensor goes to the default
device.

Example:
    >>> import json, os, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "config.json"), "w") as f:
    ...     json.dump({"model_type": "toy"}, f)
    >>> weights = {"proj.weight": np.ones((3, 2), np.float32)}
    >>> save_file(weights, os.path.join(d, "model.safetensors"))
    >>> params = read_checkpoint(d, {"proj.weight": TensorSpec.linear(("proj", "kernel"), (3, 2))})
    >>> params["proj"]["kernel"].shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding
from jax.typing import DTypeLike

from jaxlora._src.files.safetensors_read import open_safetensors
from jaxlora.models.hf.arguments import check_floating, check_weight_dtype

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "Shardings",
    "TensorSpec",
    "read_checkpoint",
    "read_config",
    "tensor_files",
]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: ``(path, shape) -> PartitionSpec | Sharding``, or ``{path regex: PartitionSpec}``.
Shardings = Callable[[str, tuple[int, ...]], Any] | Mapping[str, PartitionSpec]


def _transpose(array: np.ndarray) -> np.ndarray:
    return array.T


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one Hugging Face tensor goes in the Flax tree.

    Attributes:
        path: the Flax param path, e.g. ``("layers_0", "self_attn", "q_proj", "kernel")``.
        shape: the tensor's expected shape in the checkpoint.
        transform: Hugging Face array -> Flax array (numpy); ``None`` keeps it.
        flax_shape: the shape after ``transform``; needed when ``transform`` is given.
        inverse: Flax array -> Hugging Face array, for writing checkpoints; ``None`` keeps it.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    flax_shape: tuple[int, ...] | None = None
    inverse: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.transform is not None and self.flax_shape is None:
            raise ValueError(f"TensorSpec for {self.path}: a `transform` needs its `flax_shape`")

    @classmethod
    def linear(cls, path: tuple[str, ...], shape: tuple[int, int]) -> TensorSpec:
        """A ``torch.nn.Linear`` weight ``(out, in)`` for a Flax ``Dense`` kernel ``(in, out)``."""
        return cls(tuple(path), tuple(shape), _transpose, (shape[1], shape[0]), _transpose)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """The Flax shape."""
        return self.shape if self.flax_shape is None else tuple(self.flax_shape)


def _read_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at `{path}`; is this a Hugging Face model directory?")
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{path}` is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"`{path}` must hold a JSON object, got {type(document).__name__}")
    return document


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict.

    Raises:
        FileNotFoundError: when ``directory`` has no ``config.json``.
    """
    return _read_json(os.path.join(os.fspath(directory), CONFIG_FILE), "`config.json`")


def tensor_files(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it (sharded: from the index).

    Raises:
        FileNotFoundError: when there is neither ``model.safetensors`` nor an index, or a shard the
            index names is missing.
        ValueError: naming the file, when ``model.safetensors`` is truncated or no safetensors
            file.
    """
    directory = os.fspath(directory)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"`{index}` has no `weight_map` object")
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"the shard `{file}` named in `{index}` is missing")
        return files
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"no `{SINGLE_FILE}` or `{INDEX_FILE}` in `{directory}`; only safetensors "
            "checkpoints are read (convert a .bin checkpoint with transformers first)"
        )
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def _check_names(
    files: Mapping[str, str], expected: Mapping[str, TensorSpec], where: str, ignore: str | None
) -> None:
    missing = sorted(set(expected) - set(files))
    extra = sorted(n for n in set(files) - set(expected) if not (ignore and re.search(ignore, n)))
    if missing or extra:
        raise ValueError(
            f"the checkpoint in `{where}` does not match the model: missing tensors {missing}, "
            f"unexpected tensors {extra}; check that config.json describes these weights"
        )


def _sharding(
    path: str, shape: tuple[int, ...], mesh: Mesh | None, shardings: Shardings | None
) -> Sharding | None:
    if shardings is None:
        return None if mesh is None else NamedSharding(mesh, PartitionSpec())
    if callable(shardings):
        spec = shardings(path, shape)
    else:
        spec = next((s for rule, s in shardings.items() if re.search(rule, path)), PartitionSpec())
    if isinstance(spec, Sharding):
        return spec
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"`shardings` gave {spec!r} for `{path}`; expected a PartitionSpec or a Sharding"
        )
    if mesh is None:
        raise ValueError(f"`shardings` gave a PartitionSpec for `{path}`; pass the `mesh` as well")
    return NamedSharding(mesh, spec)


def _place(array: np.ndarray, sharding: Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _tensors(files: Mapping[str, str], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` file by file, one tensor in memory at a time; a file safetensors
    cannot read is a ValueError naming it."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        with open_safetensors(file) as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def read_checkpoint(
    directory: str | os.PathLike[str],
    expected: Mapping[str, TensorSpec],
    *,
    mesh: Mesh | None = None,
    shardings: Shardings | None = None,
    dtype: DTypeLike | None = None,
    progress: bool = False,
    ignore: str | None = None,
) -> dict[str, Any]:
    """Reads every tensor of a Hugging Face checkpoint into a nested Flax ``params`` dict.

    Args:
        directory: holds ``model.safetensors`` or an index and its shards.
        expected: Hugging Face tensor name -> :class:`TensorSpec`, exactly the checkpoint's tensors.
        mesh: a ``jax.sharding.Mesh`` for ``PartitionSpec`` shardings.
        shardings: per-tensor placement (see the module docstring); ``None`` replicates over
            ``mesh``, or uses the default device without one.
        dtype: cast every tensor to it, a floating dtype; ``None`` keeps each tensor's stored
            dtype (bf16 stays bf16).
        progress: show a ``tqdm`` progress bar.
        ignore: a regular expression of checkpoint tensors that are not weights and are skipped
            (e.g. ``rotary_emb.inv_freq`` buffers); every other tensor must be in ``expected``.

    Returns:
        The nested params dict, each leaf a ``jax.Array`` in its sharding.

    Raises:
        FileNotFoundError: for a missing weights file or shard.
        ValueError: naming every missing and unexpected tensor, or the first misshapen one; or
            naming the file, for a truncated file or one that is no safetensors file.
        TypeError: for a ``dtype`` that is not floating, or a tensor stored with an integer or
            bool dtype (named with its file).
    """
    dtype = check_weight_dtype(dtype)
    directory = os.fspath(directory)
    files = tensor_files(directory)
    _check_names(files, expected, directory, ignore)
    names = sorted(expected, key=lambda n: (files[n], n))
    tensors = _tensors(files, names)
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=len(names), desc="loading", unit="tensor")
    flat = {}
    for name, array in tensors:
        spec = expected[name]
        check_floating(name, files[name], array)
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(
                f"the tensor `{name}` in `{files[name]}` has shape {tuple(array.shape)}, "
                f"expected {tuple(spec.shape)} from config.json"
            )
        if spec.transform is not None:
            array = spec.transform(array)
            if tuple(array.shape) != spec.target_shape:
                raise ValueError(
                    f"the transform of `{name}` gave shape {tuple(array.shape)}, its TensorSpec "
                    f"says {spec.target_shape}"
                )
        if dtype is not None:
            array = array.astype(dtype)
        sharding = _sharding("/".join(spec.path), array.shape, mesh, shardings)
        flat[spec.path] = _place(np.ascontiguousarray(array), sharding)
    return traverse_util.unflatten_dict(flat)
