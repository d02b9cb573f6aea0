"""Hugging Face PEFT's adapter format, both ways: ``adapter_config.json`` +
``adapter_model.safetensors``.

PEFT keys each tensor by the PyTorch module name: ``base_model.model.<name>.lora_A.weight`` of shape
``(r, in)`` and ``.lora_B.weight`` ``(out, r)``; embeddings ``.lora_embedding_A`` ``(r, vocab)`` and
``.lora_embedding_B`` ``(dim, r)``; trainable biases of adapted modules ``.base_layer.bias``, other
biases ``.bias``; ``modules_to_save`` as the module's own parameters (``.weight``, ``.bias``).
Flax's ``(in, out)`` kernels are the transpose of PyTorch's; N-D kernels are flattened to
``(prod(in), prod(out))`` in C order; a conv's A is ``(r, Cin, *window)``, its B
``(Cout, r, 1, …)``.

A ``module_name(path, index)`` function maps a Flax module path (``"encoder/layer_0/query"``) to the
PyTorch module name: ``index`` is ``()`` for plain modules and the layer index (a tuple) for stacked
(``nn.scan``) ones, which export one PEFT module per layer; returning None means "no counterpart".
Only numpy and ``safetensors`` are needed; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora import paths
from jaxlora.checkpoint import check_fits, expected_adapter
from jaxlora.config import LoraConfig
from jaxlora.targets import BIAS, EMBEDDING, KERNEL, find_targets, find_trainable_leaves
from jaxlora.types import LORA_A, LORA_B, LoraTree, Params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
ModuleName = Callable[[str, tuple[int, ...]], str | None]
#: PEFT options that change what the tensors mean; an adapter using them cannot be read here.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def default_module_name(path: str, index: tuple[int, ...]) -> str:
    """``"encoder/layer_0/query"`` -> ``"encoder.layer_0.query"``; stacked modules need a mapping.

    Raises:
        ValueError: for a stacked module (``index`` non-empty): PEFT has one module per layer,
            and only the model's author knows its name.
    """
    if index:
        raise ValueError(
            f"the stacked module `{path}` needs a PyTorch name for layer {index}; pass "
            "`module_name=lambda path, index: ...` (e.g. f'layers.{index[0]}.attn.q_proj')"
        )
    return path.replace("/", ".")


@dataclasses.dataclass(frozen=True)
class _Entry:
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


Converter = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], tuple]


def _name(module_name: ModuleName, path: str, index: tuple[int, ...]) -> str:
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


def _factor_specs(target) -> list[tuple[str, str, Converter]]:
    a_shape, b_shape = target.a_shape[target.n_stack :], target.b_shape[target.n_stack :]
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
        if "w" in layout:
            return "weight", _conv(shape)
        return "weight", _matrix(shape, layout.count("i"))
    if leaf == BIAS:
        size = math.prod(shape)
        return "bias", ((lambda x: x.reshape(-1)), (lambda y: y.reshape(shape)), (size,))
    return ("weight" if leaf in (EMBEDDING, "scale") else leaf), (
        (lambda x: x),
        (lambda y: y),
        shape,
    )


def _entries(base: Params, config: LoraConfig, module_name: ModuleName) -> list[_Entry]:
    """Every PEFT tensor of the adapter ``config`` makes for ``base``, in a fixed order."""
    targets = find_targets(base, config)
    by_path = {t.path: t for t in targets}
    entries = []
    for target in targets:
        specs = _factor_specs(target)
        for index in np.ndindex(*target.shape[: target.n_stack]):
            name = _name(module_name, target.path, index)
            for suffix, leaf, (to_peft, from_peft, shape) in specs:
                keys = target.keys + (leaf,)
                entries.append(
                    _Entry(
                        PREFIX + name + suffix, name, False, keys, index, shape, to_peft, from_peft
                    )
                )
    shapes = {keys: tuple(leaf.shape) for keys, _, leaf in paths.flatten(base)}
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
            name = _name(module_name, module, index)
            key = f"{PREFIX}{name}.{torch_leaf}"
            entries.append(_Entry(key, name, in_saved, keys, index, shape, to_peft, from_peft))
    seen: dict[str, _Entry] = {}
    for entry in entries:
        if entry.key in seen:
            raise ValueError(
                f"`module_name` maps two leaves to the PEFT key `{entry.key}`: "
                f"`{paths.join(map(str, seen[entry.key].lora_keys))}` and "
                f"`{paths.join(map(str, entry.lora_keys))}`"
            )
        seen[entry.key] = entry
    return entries


def _peft_targets(spec: Any, name: str) -> bool:
    """PEFT's ``target_modules`` rule: a string is full-matched as a regex, a list entry matches
    the whole name or a ``.``-suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _peft_pattern(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a PEFT ``rank_pattern`` / ``alpha_pattern`` that matches ``name``."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def _exact_names(chosen: list[str], known: list[str], sep: str) -> list[str] | str:
    """``chosen`` as a list when the suffix rule (``sep``) selects exactly them among ``known``,
    otherwise as a regex alternation of the escaped names."""
    picked = {
        n for n in set(known) | set(chosen) if any(n == c or n.endswith(sep + c) for c in chosen)
    }
    if picked == set(chosen):
        return sorted(set(chosen))
    return "(?:" + "|".join(re.escape(c) for c in sorted(set(chosen))) + ")"


def _exact_key(name: str, known: list[str], matches: Callable[[str, str], bool]) -> str:
    """A pattern key for one module: its name when that matches it and no other known name."""
    if matches(name, name) and not any(matches(name, o) for o in known if o != name):
        return name
    return "^" + re.escape(name)


def _modules(
    base: Params, layouts: Mapping[str, str], module_name: ModuleName, adaptable: bool
) -> list[tuple[str, list[str]]]:
    """``(flax module path, PyTorch names per layer)`` for the modules of ``base`` that hold an
    adaptable kernel (``adaptable``) or any leaf; modules ``module_name`` cannot name are left out.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for _, parts, leaf in paths.flatten(base):
        shape = tuple(getattr(leaf, "shape", ()))
        if not adaptable:
            for k in range(1, len(parts)):
                shapes.setdefault(paths.join(parts[:k]), shape)
        elif parts[-1] in (KERNEL, EMBEDDING) and len(shape) >= 2:
            shapes.setdefault(paths.join(parts[:-1]), shape)
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


def peft_config(
    config: LoraConfig,
    base: Params,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` that PEFT reads for the adapter ``config`` makes on ``base``.

    ``target_modules`` lists the PyTorch names of the adapted modules (a regex where a list would
    select more); each module whose rank or alpha differs from ``r`` / ``lora_alpha`` gets its own
    ``rank_pattern`` / ``alpha_pattern`` entry.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> base = {f"l{i}": {"q": {"kernel": jnp.zeros((4, 4))}} for i in range(2)}
        >>> config = jaxlora.LoraConfig(r=4, target_modules=["q"], rank_pattern={"l1/q": 2})
        >>> out = peft_config(config, base)
        >>> out["target_modules"], out["rank_pattern"], out["peft_type"]
        (['l0.q', 'l1.q'], {'l1.q': 2}, 'LORA')
    """
    entries = _entries(base, config, module_name)
    known = [n for _, names in _modules(base, config.layouts, module_name, True) for n in names]
    chosen = list(dict.fromkeys(e.module for e in entries if e.lora_keys[-1] in (LORA_A, LORA_B)))
    ranks, alphas = {}, {}
    for target in find_targets(base, config):
        for index in np.ndindex(*target.shape[: target.n_stack]):
            name = _name(module_name, target.path, index)
            if target.rank != config.r:
                ranks[name] = target.rank
            if target.alpha != config.lora_alpha:
                alphas[name] = target.alpha
    rule = lambda key, name: _peft_pattern([key], name) is not None  # noqa: E731
    saved = sorted({e.module for e in entries if e.saved})
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": _exact_names(chosen, known, "."),
        "exclude_modules": None,
        "rank_pattern": {_exact_key(n, known, rule): r for n, r in ranks.items()},
        "alpha_pattern": {_exact_key(n, known, rule): a for n, a in alphas.items()},
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "modules_to_save": saved or None,
        "init_lora_weights": config.init_lora_weights,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        **_UNSUPPORTED,
    }


def _by_path(tree: Any) -> dict[str, Any]:
    return {paths.join(names): leaf for _, names, leaf in paths.flatten(tree)}


def save_peft(
    directory: str | os.PathLike[str],
    lora: LoraTree,
    config: LoraConfig,
    base: Params,
    *,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes Θ as a PEFT adapter: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Load it in PyTorch with ``peft.PeftModel.from_pretrained(torch_model, directory)``.

    Args:
        directory: created if missing; the two files are (over)written.
        lora: the adapter Θ.
        config: the config Θ was made with.
        base: the base params (arrays or ``jax.ShapeDtypeStruct``), for the kernels' layouts.
        module_name: Flax module path and layer index -> PyTorch module name.
        base_model_name_or_path: recorded in the config for PEFT (e.g. a hub id).

    Raises:
        ValueError: when Θ does not fit ``base`` (names every path with both shapes), when a
            stacked module gets no name, or when two leaves map to one PEFT key.
    """
    from safetensors.numpy import save_file

    check_fits(_by_path(lora), _by_path(expected_adapter(base, config)), "`lora`")
    tensors = {}
    for entry in _entries(base, config, module_name):
        array = np.asarray(paths.get_in(lora, entry.lora_keys))[entry.index]
        tensors[entry.key] = np.ascontiguousarray(entry.to_peft(array))
    document = peft_config(config, base, module_name, base_model_name_or_path)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


_MUTATES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_supported(peft: Mapping[str, Any], source: str) -> None:
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source} has `peft_type`={peft.get('peft_type')!r}; only 'LORA' is read")
    used = {k: peft[k] for k in _UNSUPPORTED if peft.get(k) not in (None, False, [], {})}
    if used:
        raise ValueError(f"{source} uses PEFT options jaxlora cannot represent: {used}")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATES_BASE):
        raise ValueError(
            f"{source} has `init_lora_weights`={init!r}, which changes the base weights; convert "
            "it to a plain LoRA adapter in PEFT first (save_pretrained with "
            "`path_initial_model_for_weight_conversion`)"
        )


def config_from_peft(
    peft: Mapping[str, Any],
    base: Params,
    *,
    module_name: ModuleName = default_module_name,
    layouts: Mapping[str, str] | None = None,
    dtype: str = "float32",
    source: str = "the PEFT config",
) -> LoraConfig:
    """The :class:`~jaxlora.LoraConfig` for ``base`` equivalent to a PEFT ``adapter_config.json``.

    PEFT's rules are applied to the PyTorch names of ``base``'s modules: ``target_modules``,
    ``exclude_modules`` and ``modules_to_save`` pick the modules, ``rank_pattern`` /
    ``alpha_pattern`` their ranks and alphas; the result names the Flax paths explicitly.

    Raises:
        ValueError: for a non-LoRA or unsupported adapter, when nothing matches, or when the
            layers of one stacked module would get different targets or ranks.
    """
    _check_supported(peft, source)
    layouts = dict(layouts or {})
    spec = peft.get("target_modules")
    excluded = peft.get("exclude_modules")
    saved_names = list(peft.get("modules_to_save") or ())
    rank_pattern, alpha_pattern = peft.get("rank_pattern") or {}, peft.get("alpha_pattern") or {}
    r, alpha = peft.get("r", 8), peft.get("lora_alpha", 8)
    candidates = _modules(base, layouts, module_name, True)

    def is_target(name: str) -> bool:
        if spec is None or (excluded and _peft_targets(excluded, name)):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved_names):
            return False
        return spec == "all-linear" or _peft_targets(spec, name)

    chosen, ranks, alphas = [], {}, {}
    for module, names in candidates:
        hits = [is_target(n) for n in names]
        if any(hits) and not all(hits):
            raise ValueError(
                f"{source} adapts only some layers of the stacked module `{module}` "
                f"({[n for n, h in zip(names, hits, strict=True) if h]}); jaxlora adapts a stack "
                "as a whole"
            )
        if not all(hits):
            continue
        chosen.append(module)
        for field, pattern, default, out in (
            ("rank", rank_pattern, r, ranks),
            ("alpha", alpha_pattern, alpha, alphas),
        ):
            values = {pattern.get(_peft_pattern(pattern, n), default) for n in names}
            if len(values) > 1:
                raise ValueError(
                    f"{source} gives the layers of the stacked module `{module}` different "
                    f"{field}s {sorted(values)}; jaxlora needs one {field} per stacked module"
                )
            if values != {default}:
                out[module] = values.pop()
    if not chosen:
        seen = [n for _, names in candidates for n in names]
        raise ValueError(
            f"{source} has `target_modules`={spec!r}, which matches no module of `base` under "
            f"`module_name`; PyTorch names of its modules: {paths.preview(seen)}"
        )
    saved = []
    for module, names in _modules(base, layouts, module_name, False):
        hits = [any(n == m or n.endswith("." + m) for m in saved_names) for n in names]
        if all(hits) and not any(module.startswith(s + "/") for s in saved):
            saved.append(module)
    known = [module for module, _ in candidates]
    rule = paths.matches_name
    init = peft.get("init_lora_weights", True)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=peft.get("lora_dropout") or 0.0,
        bias=peft.get("bias", "none"),
        target_modules=_exact_names(chosen, known, "/"),
        modules_to_save=saved or None,
        rank_pattern={_exact_key(m, known, rule): v for m, v in ranks.items()},
        alpha_pattern={_exact_key(m, known, rule): v for m, v in alphas.items()},
        use_rslora=bool(peft.get("use_rslora", False)),
        init_lora_weights=init if init in (True, False, "gaussian") else True,
        task_type=peft.get("task_type"),
        dtype=dtype,
        layouts=layouts,
    )


def _check_keys(entries: list[_Entry], tensors: Mapping[str, Any], source: str) -> None:
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
            f"{source} does not fit `base`: "
            + "; ".join(problems)
            + ". Does `module_name` map the Flax paths to this model's PyTorch module names?"
        )


def load_peft(
    directory: str | os.PathLike[str],
    base: Params,
    *,
    module_name: ModuleName = default_module_name,
    layouts: Mapping[str, str] | None = None,
    dtype: str = "float32",
) -> tuple[LoraTree, LoraConfig]:
    """Reads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Unlike PEFT, which warns and carries on, every missing, unexpected or mis-shaped tensor is an
    error: an adapter that silently loads nothing trains or serves the base model.

    Args:
        directory: the adapter directory (what ``PeftModel.save_pretrained`` wrote).
        base: the Flax base params (arrays or ``jax.ShapeDtypeStruct``) the adapter belongs to.
        module_name: Flax module path and layer index -> PyTorch module name.
        layouts: jaxlora layouts for N-D or stacked kernels (see :class:`~jaxlora.LoraConfig`).
        dtype: dtype of the factors A and B in Θ.

    Returns:
        ``(lora, config)``, ready for :func:`jaxlora.merge` or further training.

    Raises:
        ValueError: for unsupported adapters and for any key that does not fit ``base``.
    """
    from safetensors.numpy import load_file

    source = f"the PEFT adapter in `{os.fspath(directory)}`"
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        document = json.load(f)
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    config = config_from_peft(
        document, base, module_name=module_name, layouts=layouts, dtype=dtype, source=source
    )
    entries = _entries(base, config, module_name)
    _check_keys(entries, tensors, source)
    expected = expected_adapter(base, config)
    arrays: dict[tuple[Any, ...], np.ndarray] = {}
    for entry in entries:
        if entry.lora_keys not in arrays:
            like = paths.get_in(expected, entry.lora_keys)
            arrays[entry.lora_keys] = np.zeros(like.shape, like.dtype)
        target = arrays[entry.lora_keys]
        target[entry.index] = entry.from_peft(np.asarray(tensors[entry.key])).astype(target.dtype)
    lora: LoraTree = {}
    for keys, array in arrays.items():
        paths.set_in(lora, keys, jnp.asarray(array))
    return lora, config
