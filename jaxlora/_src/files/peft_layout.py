"""Where each tensor of a jaxlora adapter goes in Hugging Face PEFT's format, and its shape there.

PEFT keys each tensor by the PyTorch module name: ``base_model.model.<name>.lora_A.weight`` of shape
``(r, in)`` and ``.lora_B.weight`` ``(out, r)``; embeddings ``.lora_embedding_A`` ``(r, vocab)`` and
``.lora_embedding_B`` ``(dim, r)``; trainable biases of adapted modules ``.base_layer.bias``, other
biases ``.bias``; ``modules_to_save`` as the module's own parameters (``.weight``, ``.bias``); a
DoRA magnitude ``.lora_magnitude_vector``, ``(out,)`` (a conv's ``(1, Cout, 1, …)``).
Flax's ``(in, out)`` kernels are the transpose of PyTorch's (Equinox's ``weight`` is PyTorch's);
N-D kernels are flattened to ``(prod(in), prod(out))`` in C order, input and output axes each in
kernel order whatever the layout (``"oio"`` (h, d, k): in ``d``, out ``h·k``); a conv's A is
``(r, Cin, *window)``, its B ``(Cout, r, 1, …)``.

A ``module_name(path, index)`` function maps a Flax module path (``"encoder/layer_0/query"``) to the
PyTorch module name: ``index`` is ``()`` for plain modules and the layer index (a tuple) for stacked
(``nn.scan``) ones, which export one PEFT module per layer; returning None means "no counterpart".
:func:`tensor_entries` lists every PEFT tensor of an adapter with the converters between layouts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxlora._src import paths
from jaxlora._src.config import axes_order, conventions
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import BIAS, EMBEDDING, KERNEL, find_targets, find_trainable_leaves
from jaxlora._src.types import LORA_A, LORA_B, Params
from jaxlora._src.variants import base as variants

#: What PEFT puts before every module name in its tensor keys.
PREFIX = "base_model.model."
#: ``(flax module path, layer index) -> PyTorch module name`` (None: no counterpart).
ModuleName = Callable[[str, tuple[int, ...]], str | None]


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One PEFT tensor: its key and PyTorch module, where it sits in Θ (``lora_keys`` + stack
    ``index``), the shape PEFT gives it, and the converters between the two layouts."""

    key: str
    module: str
    saved: bool
    lora_keys: tuple[Any, ...]
    index: tuple[int, ...]
    peft_shape: tuple[int, ...]
    to_peft: Callable[[np.ndarray], np.ndarray]
    from_peft: Callable[[np.ndarray], np.ndarray]


#: ``(to_peft, from_peft, peft_shape)`` for one tensor.
Converter = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], tuple]


def torch_name(module_name: ModuleName, path: str, index: tuple[int, ...]) -> str:
    """``module_name(path, index)``, checked to be a non-empty string.

    Raises:
        ValueError: naming the module and layer index that got no PyTorch name.

    Example:
        >>> torch_name(lambda path, index: f"layers.{index[0]}.q", "stack/q", (3,))
        'layers.3.q'
    """
    name = module_name(path, index)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`module_name` gave {name!r} for the module `{path}` (layer index {index}); every "
            "adapted or saved module needs a PyTorch module name"
        )
    return name


def _layout(layouts: Mapping[str, str], module: str, shape: tuple[int, ...]) -> str | None:
    found = paths.first_match(layouts, module)
    if found is not None:
        return found[1]
    return "io" if len(shape) == 2 else None


def _n_stack(layouts: Mapping[str, str], module: str, shape: tuple[int, ...]) -> int:
    layout = _layout(layouts, module, shape) or ""
    return len(layout) - len(layout.lstrip("s"))


def _matrix(shape: tuple[int, ...], n_rows: int) -> Converter:
    """Flax ``rows + cols`` <-> PyTorch ``(prod(cols), prod(rows))``, the transposed 2-D form."""
    rows, cols = math.prod(shape[:n_rows]), math.prod(shape[n_rows:])
    return (lambda x: x.reshape(rows, cols).T), (lambda y: y.T.reshape(shape)), (cols, rows)


def _conv(shape: tuple[int, ...]) -> Converter:
    """Flax ``window + (c_in, c_out)`` <-> PyTorch ``(c_out, c_in) + window``."""
    n_window = len(shape) - 2
    perm = (n_window + 1, n_window, *range(n_window))
    inverse = tuple(int(i) for i in np.argsort(perm))
    peft_shape = tuple(shape[i] for i in perm)
    return (lambda x: x.transpose(perm)), (lambda y: y.transpose(inverse)), peft_shape


def _pointwise(shape: tuple[int, ...], n_window: int) -> Converter:
    """A conv's B: flax ``(r, c_out)`` <-> PyTorch 1x1 conv weight ``(c_out, r, 1, …)``."""
    peft_shape = (shape[1], shape[0]) + (1,) * n_window
    return (lambda x: x.T.reshape(peft_shape)), (lambda y: y.reshape(shape[::-1]).T), peft_shape


def _reshape(shape: tuple[int, ...], peft_shape: tuple[int, ...]) -> Converter:
    """Flax ``shape`` <-> PyTorch ``peft_shape``, the same elements in C order."""
    return (lambda x: x.reshape(peft_shape)), (lambda y: y.reshape(shape)), peft_shape


def _factor_specs(target, variant: str) -> list[tuple[str, str, Converter]]:
    """The PEFT tensors of one target: A, B, then the variant's extra tensors."""
    a_shape, b_shape = target.a_shape[target.n_stack :], target.b_shape[target.n_stack :]
    extra = variants.get(variant).file_entries(target)
    return _lora_specs(target, a_shape, b_shape) + [
        (e.suffix, e.leaf, _reshape(e.shape, e.peft_shape)) for e in extra
    ]


def _lora_specs(target, a_shape, b_shape) -> list[tuple[str, str, Converter]]:
    if target.kind == "embed":
        return [
            (".lora_embedding_A", LORA_A, _matrix(a_shape, 1)),
            (".lora_embedding_B", LORA_B, _matrix(b_shape, 1)),
        ]
    if target.kind == "conv":
        if target.layout.count("i") != 1 or target.n_out != 1:
            raise ValueError(
                f"the conv kernel at `{target.path}` has layout {target.layout!r}; PEFT's conv "
                "LoRA needs one input and one output axis"
            )
        return [
            (".lora_A.weight", LORA_A, _conv(a_shape)),
            (".lora_B.weight", LORA_B, _pointwise(b_shape, target.layout.count("w"))),
        ]
    return [
        (".lora_A.weight", LORA_A, _matrix(a_shape, len(a_shape) - 1)),
        (".lora_B.weight", LORA_B, _matrix(b_shape, 1)),
    ]


def _in_kernel_order(convert: Converter, layout: str) -> Converter:
    """``convert``, made for the canonical order, for a kernel whose axes ``layout`` orders."""
    to_peft, from_peft, peft_shape = convert
    return (
        lambda x: to_peft(axes_order.to_canonical(x, layout)),
        lambda y: axes_order.from_canonical(from_peft(y), layout),
        peft_shape,
    )


def _copy_spec(layouts: Mapping[str, str], module: str, leaf: str, shape: tuple[int, ...]):
    """PyTorch leaf name and converter for a trainable copy (a bias, a modules_to_save leaf)."""
    if leaf == KERNEL and len(shape) >= 2:
        layout = _layout(layouts, module, shape)
        if layout is None:
            raise ValueError(
                f"cannot tell the input and output axes of the kernel `{module}/{leaf}` {shape} "
                "to save in full; state them with `LoraConfig(layouts={...})`"
            )
        layout = layout.lstrip("s")
        flat = axes_order.canonical_shape(shape, layout)
        convert = _conv(flat) if "w" in layout else _matrix(flat, layout.count("i"))
        return "weight", _in_kernel_order(convert, layout)
    if leaf == BIAS:
        size = math.prod(shape)
        return "bias", ((lambda x: x.reshape(-1)), (lambda y: y.reshape(shape)), (size,))
    return ("weight" if leaf in (EMBEDDING, "scale") else leaf), (
        (lambda x: x),
        (lambda y: y),
        shape,
    )


def tensor_entries(
    base: Params, config: LoraConfig, module_name: ModuleName, variant: str = "lora"
) -> list[TensorEntry]:
    """Every PEFT tensor of the adapter of ``variant`` that ``config`` makes for ``base``, in a
    fixed order (for ``"dora"``, each target's magnitude too).

    Raises:
        ValueError: when ``module_name`` names no module for a layer, maps two leaves to one key,
            a kernel's axes cannot be told apart, or the variant cannot adapt a target.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> base = {"q": {"kernel": jnp.zeros((4, 6))}}
        >>> config = jaxlora.LoraConfig(r=2, target_modules=["q"])
        >>> [(e.key, e.peft_shape) for e in tensor_entries(base, config, lambda p, i: p)]
        [('base_model.model.q.lora_A.weight', (2, 4)), ('base_model.model.q.lora_B.weight', (6, 2))]
    """
    config = conventions.with_tree_layouts(config, base)  # Equinox's weights: (out, in)
    targets = find_targets(base, config)
    by_path = {t.path: t for t in targets}
    entries = []
    for target in targets:
        specs = _factor_specs(target, variant)
        for index in np.ndindex(*target.shape[: target.n_stack]):
            name = torch_name(module_name, target.path, index)
            for suffix, leaf, (to_peft, from_peft, shape) in specs:
                keys = target.keys + (leaf,)
                entries.append(
                    TensorEntry(
                        PREFIX + name + suffix, name, False, keys, index, shape, to_peft, from_peft
                    )
                )
    shapes = {keys: tuple(getattr(x, "shape", ())) for keys, _, x in paths.flatten(base)}
    saved = config.modules_to_save or ()
    for keys, path in find_trainable_leaves(base, config, targets):
        names = path.split("/")
        module, leaf = paths.join(names[:-1]), names[-1]
        target = by_path.get(module)
        if target is not None:
            n_stack = target.n_stack
        else:
            n_stack = _n_stack(config.layouts, module, shapes[keys])
        prefixes = [paths.join(names[:k]) for k in range(1, len(names))]
        in_saved = any(paths.matches_literal(n, p) for n in saved for p in prefixes)
        torch_leaf, (to_peft, from_peft, shape) = _copy_spec(
            config.layouts, module, leaf, shapes[keys][n_stack:]
        )
        if not in_saved and target is not None:
            torch_leaf = "base_layer." + torch_leaf
        for index in np.ndindex(*shapes[keys][:n_stack]):
            name = torch_name(module_name, module, index)
            key = f"{PREFIX}{name}.{torch_leaf}"
            entries.append(TensorEntry(key, name, in_saved, keys, index, shape, to_peft, from_peft))
    seen: dict[str, TensorEntry] = {}
    for entry in entries:
        if entry.key in seen:
            raise ValueError(
                f"`module_name` maps two leaves to the PEFT key `{entry.key}`: "
                f"`{paths.join(map(str, seen[entry.key].lora_keys))}` and "
                f"`{paths.join(map(str, entry.lora_keys))}`"
            )
        seen[entry.key] = entry
    return entries


def named_modules(
    base: Params, layouts: Mapping[str, str], module_name: ModuleName, adaptable: bool
) -> list[tuple[str, list[str]]]:
    """``(flax module path, PyTorch names per layer)`` for the modules of ``base`` that hold an
    adaptable kernel (``adaptable``) or any leaf; modules ``module_name`` cannot name are left out.
    """
    layouts, shapes = conventions.with_layouts_of(layouts, base), {}
    norms = conventions.norm_paths(base)  # a stacked norm's 2-D `weight` is no kernel
    for _, parts, leaf in paths.flatten(base):
        shape, module = tuple(getattr(leaf, "shape", ())), paths.join(parts[:-1])
        if not adaptable:
            for k in range(1, len(parts)):
                shapes.setdefault(paths.join(parts[:k]), shape)
        elif parts[-1] in conventions.WEIGHT_LEAVES and len(shape) >= 2 and module not in norms:
            shapes.setdefault(module, shape)
    found = []
    for module, shape in shapes.items():
        names = []
        for index in np.ndindex(*shape[: _n_stack(layouts, module, shape)]):
            try:
                names.append(module_name(module, index))
            except ValueError:
                names.append(None)
        if names and all(names):
            found.append((module, names))
    return found


def check_tensors(entries: list[TensorEntry], tensors: Mapping[str, Any], source: str) -> None:
    """Checks that ``tensors`` (a PEFT state dict) holds exactly the ``entries``, each in its shape.

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys, from ``source``.
    """
    expected = {e.key: e for e in entries}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"`{k}` {tuple(tensors[k].shape)} (expected {e.peft_shape})"
        for k, e in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(e.peft_shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {paths.preview(missing, 8)}")
    if unexpected:
        problems.append(f"unexpected keys {paths.preview(unexpected, 8)}")
    if misshaped:
        problems.append(f"mis-shaped keys {paths.preview(misshaped, 8)}")
    if problems:
        raise ValueError(
            f"{source} does not fit `frozen`: "
            + "; ".join(problems)
            + ". Does `module_name` map the Flax paths to this model's PyTorch module names?"
        )
