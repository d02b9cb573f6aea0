"""Hugging Face PEFT's adapter format, both ways: ``adapter_config.json`` +
``adapter_model.safetensors``.

:func:`save_peft` writes an adapter that PEFT loads with ``PeftModel.from_pretrained``;
:func:`load_peft` reads one back, turning PEFT's ``target_modules`` / ``rank_pattern`` /
``alpha_pattern`` rules into a :class:`~jaxlora.LoraConfig` that names the Flax paths. Where each
tensor goes, and in what shape, is :mod:`jaxlora.peft_layout`. DoRA adapters (a Θ with
``lora_magnitude`` leaves, see :mod:`jaxlora.dora`) are PEFT's ``use_dora: true``. Only numpy and
``safetensors`` are needed; torch is never imported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src import paths
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import find_targets
from jaxlora._src.files.peft_layout import PREFIX as PREFIX
from jaxlora._src.files.peft_layout import Converter as Converter
from jaxlora._src.files.peft_layout import ModuleName as ModuleName
from jaxlora._src.files.peft_layout import check_tensors, named_modules, tensor_entries, torch_name
from jaxlora._src.tree.fit import check_fits, expected_adapter
from jaxlora._src.types import LORA_A, LORA_B, LORA_MAGNITUDE, LoraTree, Params
from jaxlora._src.variants.dora import dora_split

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT options that change what the tensors mean; an adapter using them cannot be read here.
_UNSUPPORTED = {
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


def _expected(base: Params, config: LoraConfig, use_dora: bool) -> LoraTree:
    """Shapes and dtypes of the Θ ``config`` makes for ``base`` (the DoRA one with ``use_dora``)."""
    if not use_dora:
        return expected_adapter(base, config)
    return jax.eval_shape(lambda params: dora_split(params, config, jax.random.key(0))[1], base)


def peft_config(
    config: LoraConfig,
    base: Params,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
    use_dora: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` that PEFT reads for the adapter ``config`` makes on ``base``
    (with ``use_dora``, for its DoRA variant).

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
    entries = tensor_entries(base, config, module_name)
    known = [
        n for _, names in named_modules(base, config.layouts, module_name, True) for n in names
    ]
    chosen = list(dict.fromkeys(e.module for e in entries if e.lora_keys[-1] in (LORA_A, LORA_B)))
    ranks, alphas = {}, {}
    for target in find_targets(base, config):
        for index in np.ndindex(*target.shape[: target.n_stack]):
            name = torch_name(module_name, target.path, index)
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
        "use_dora": use_dora,
        **_UNSUPPORTED,
    }


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

    Load it in PyTorch with ``peft.PeftModel.from_pretrained(torch_model, directory)``. A Θ with
    ``lora_magnitude`` leaves (:func:`jaxlora.dora.dora_split`) is written as a DoRA adapter
    (``use_dora: true``, each magnitude as ``<module>.lora_magnitude_vector``).

    Args:
        directory: created if missing; the two files are (over)written.
        lora: the adapter Θ.
        config: the config Θ was made with.
        base: the base params (arrays or ``jax.ShapeDtypeStruct``), for the kernels' layouts.
        module_name: Flax module path and layer index -> PyTorch module name.
        base_model_name_or_path: recorded in the config for PEFT (e.g. a hub id).

    Raises:
        ValueError: when Θ does not fit ``base`` (names every path with both shapes; a DoRA Θ
            needs a magnitude on every target), when a stacked module gets no name, or when two
            leaves map to one PEFT key.
    """
    from safetensors.numpy import save_file

    use_dora = any(names[-1] == LORA_MAGNITUDE for _, names, _ in paths.flatten(lora))
    expected = _expected(base, config, use_dora)
    check_fits(paths.by_path(lora), paths.by_path(expected), "`lora`")
    tensors = {}
    for entry in tensor_entries(base, config, module_name, use_dora):
        array = np.asarray(paths.get_in(lora, entry.lora_keys))[entry.index]
        tensors[entry.key] = np.ascontiguousarray(entry.to_peft(array))
    document = peft_config(config, base, module_name, base_model_name_or_path, use_dora)
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
    ``use_dora`` is accepted: DoRA lives in Θ (``lora_magnitude``), not in the config.

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
    candidates = named_modules(base, layouts, module_name, True)

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
    for module, names in named_modules(base, layouts, module_name, False):
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


def load_peft(
    directory: str | os.PathLike[str],
    base: Params,
    *,
    module_name: ModuleName = default_module_name,
    layouts: Mapping[str, str] | None = None,
    dtype: str = "float32",
) -> tuple[LoraTree, LoraConfig]:
    """Reads a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    A DoRA adapter (``use_dora: true``) gives a Θ with ``lora_magnitude`` leaves, for
    :func:`jaxlora.dora.dora_merge`.

    Unlike PEFT, which warns and carries on, every missing, unexpected or mis-shaped tensor is an
    error: an adapter that silently loads nothing trains or serves the base model.

    Args:
        directory: the adapter directory (what ``PeftModel.save_pretrained`` wrote).
        base: the Flax base params (arrays or ``jax.ShapeDtypeStruct``) the adapter belongs to.
        module_name: Flax module path and layer index -> PyTorch module name.
        layouts: jaxlora layouts for N-D or stacked kernels (see :class:`~jaxlora.LoraConfig`).
        dtype: dtype of the factors A and B (and DoRA magnitudes) in Θ.

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
    use_dora = bool(document.get("use_dora", False))
    entries = tensor_entries(base, config, module_name, use_dora)
    check_tensors(entries, tensors, source)
    expected = _expected(base, config, use_dora)
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
