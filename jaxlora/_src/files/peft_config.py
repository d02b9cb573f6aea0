"""PEFT's ``adapter_config.json`` <-> :class:`~jaxlora.LoraConfig`, both ways.

PEFT selects modules by their PyTorch names (``target_modules``, ``exclude_modules``,
``modules_to_save``) and sets per-module ranks and alphas by name patterns (``rank_pattern``,
``alpha_pattern``). :func:`peft_config` writes those rules for the Flax paths a config adapts;
:func:`config_from_peft` applies PEFT's rules to the PyTorch names of a frozen base's modules and
returns a config that names the Flax paths explicitly. A :data:`~jaxlora.peft.ModuleName` function
maps the two kinds of name (:func:`default_module_name` when they agree).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxlora._src import paths, validate
from jaxlora._src.config import peft_rules
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import find_targets
from jaxlora._src.files.peft_layout import ModuleName, named_modules, tensor_entries, torch_name
from jaxlora._src.types import LORA_A, LORA_B, Params

#: PEFT options that change what the tensors mean; an adapter using them cannot be read here.
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}
#: ``init_lora_weights`` modes that change the base weights, not only the adapter.
_MUTATES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def default_module_name(path: str, index: tuple[int, ...]) -> str:
    """``"encoder/layer_0/query"`` -> ``"encoder.layer_0.query"``; stacked modules need a mapping.

    Raises:
        ValueError: for a stacked module (``index`` non-empty): PEFT has one module per layer,
            and only the model's author knows its name.

    Example:
        >>> default_module_name("encoder/layer_0/query", ())
        'encoder.layer_0.query'
    """
    validate.string("path", path, nonempty=False)
    validate.int_tuple("index", index)
    if index:
        raise ValueError(
            f"the stacked module `{path}` needs a PyTorch name for layer {index}; pass "
            "`module_name=lambda path, index: ...` (e.g. f'layers.{index[0]}.attn.q_proj')"
        )
    return path.replace("/", ".")


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


def peft_config(
    config: LoraConfig,
    frozen: Params,
    module_name: ModuleName = default_module_name,
    base_model_name_or_path: str | None = None,
    use_dora: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` that PEFT reads for the adapter ``config`` makes on ``frozen``
    (with ``use_dora``, for its DoRA variant).

    ``target_modules`` lists the PyTorch names of the adapted modules (a regex where a list would
    select more); each module whose rank or alpha differs from ``r`` / ``lora_alpha`` gets its own
    ``rank_pattern`` / ``alpha_pattern`` entry.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> frozen = {f"l{i}": {"q": {"kernel": jnp.zeros((4, 4))}} for i in range(2)}
        >>> config = jaxlora.LoraConfig(r=4, target_modules=["q"], rank_pattern={"l1/q": 2})
        >>> out = peft_config(config, frozen)
        >>> out["target_modules"], out["rank_pattern"], out["peft_type"]
        (['l0.q', 'l1.q'], {'l1.q': 2}, 'LORA')
    """
    require_config(config, "peft_config")
    validate.pytree("frozen", frozen)
    validate.function("module_name", module_name)
    validate.boolean("use_dora", use_dora)
    if base_model_name_or_path is not None:
        validate.string("base_model_name_or_path", base_model_name_or_path)
    entries = tensor_entries(frozen, config, module_name)
    known = [
        n for _, names in named_modules(frozen, config.layouts, module_name, True) for n in names
    ]
    chosen = list(dict.fromkeys(e.module for e in entries if e.lora_keys[-1] in (LORA_A, LORA_B)))
    ranks, alphas = {}, {}
    for target in find_targets(frozen, config):
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
        # `target_modules` already names each adapted layer, which these would filter again.
        "layers_to_transform": None,
        "layers_pattern": None,
        **_UNSUPPORTED,
    }


def _check_supported(peft: Mapping[str, Any], source: str) -> None:
    """Raises for a non-LoRA adapter, or one whose options jaxlora cannot represent."""
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


def _one_value(
    pattern: Mapping[str, Any], default: Any, names: list[str], field: str, where: str
) -> Any:
    """The value a PEFT ``rank_pattern`` / ``alpha_pattern`` gives all ``names`` (the layers of
    one module); ``where`` names the adapter and the module for the error."""
    keys = [_peft_pattern(pattern, n) for n in names]
    values = {default if key is None else pattern[key] for key in keys}
    if len(values) > 1:
        raise ValueError(
            f"{where} different {field}s {sorted(values)}; jaxlora needs one {field} per stacked "
            "module"
        )
    return values.pop()


def _adapted_modules(
    peft: Mapping[str, Any],
    candidates: list[tuple[str, list[str]]],
    source: str,
    linear: set[str] | None = None,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The Flax modules PEFT adapts among ``candidates`` (``(module, PyTorch names)``), with the
    ranks and alphas that differ from ``r`` / ``lora_alpha``; for ``"all-linear"``, only among
    the ``linear`` modules (Dense kernels but the output embedding)."""
    r, alpha = peft.get("r", 8), peft.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = peft.get("rank_pattern") or {}, peft.get("alpha_pattern") or {}
    chosen, ranks, alphas = [], {}, {}
    for module, names in candidates:
        if linear is not None and module not in linear:
            continue
        hits = [peft_rules.peft_adapts(peft, n) for n in names]
        if any(hits) and not all(hits):
            raise ValueError(
                f"{source} adapts only some layers of the stacked module `{module}` "
                f"({[n for n, h in zip(names, hits, strict=True) if h]}); jaxlora adapts a stack "
                "as a whole"
            )
        if not all(hits):
            continue
        chosen.append(module)
        where = f"{source} gives the layers of the stacked module `{module}`"
        rank = _one_value(rank_pattern, r, names, "rank", where)
        if rank != r:
            ranks[module] = rank
        module_alpha = _one_value(alpha_pattern, alpha, names, "alpha", where)
        if module_alpha != alpha:
            alphas[module] = module_alpha
    if not chosen:
        seen = [n for _, names in candidates for n in names]
        raise ValueError(
            f"{source} has `target_modules`={peft.get('target_modules')!r}, which matches no "
            f"module of `frozen` under `module_name`; PyTorch names of its modules: "
            f"{paths.preview(seen)}"
        )
    return chosen, ranks, alphas


def _saved_modules(saved_names: list[str], modules: list[tuple[str, list[str]]]) -> list[str]:
    """The outermost Flax modules all of whose PyTorch names PEFT's ``modules_to_save`` takes."""
    saved: list[str] = []
    for module, names in modules:
        hits = [any(n == m or n.endswith("." + m) for m in saved_names) for n in names]
        if all(hits) and not any(module.startswith(s + "/") for s in saved):
            saved.append(module)
    return saved


def config_from_peft(
    peft: Mapping[str, Any],
    frozen: Params,
    *,
    module_name: ModuleName = default_module_name,
    layouts: Mapping[str, str] | None = None,
    dtype: str = "float32",
    source: str = "the PEFT config",
) -> LoraConfig:
    """The :class:`~jaxlora.LoraConfig` for ``frozen`` equivalent to a PEFT
    ``adapter_config.json``.

    PEFT's rules are applied to the PyTorch names of ``frozen``'s modules: ``target_modules``
    (``"all-linear"`` as :func:`~jaxlora.find_targets` reads it), ``layers_to_transform`` /
    ``layers_pattern``, ``exclude_modules``, ``modules_to_save`` and the heads of ``task_type``
    pick the modules, ``rank_pattern`` / ``alpha_pattern`` their ranks and alphas; the result
    names the Flax paths explicitly (so it needs no layer filter of its own).
    ``use_dora`` is accepted: DoRA lives in Θ (``lora_magnitude``), not in the config.

    Raises:
        ValueError: for a non-LoRA or unsupported adapter, when nothing matches, or when the
            layers of one stacked module would get different targets or ranks.

    Example:
        >>> import jax.numpy as jnp
        >>> frozen = {"l0": {name: {"kernel": jnp.zeros((4, 4))} for name in ("q", "v")}}
        >>> peft = {"r": 4, "lora_alpha": 8, "target_modules": ["q"], "rank_pattern": {"q": 2}}
        >>> config = config_from_peft(peft, frozen)
        >>> config.target_modules, config.rank_pattern
        (('l0/q',), {'l0/q': 2})
    """
    validate.mapping("peft", peft)
    validate.pytree("frozen", frozen)
    validate.function("module_name", module_name)
    if layouts is not None:
        validate.mapping("layouts", layouts)
    validate.string("source", source)
    _check_supported(peft, source)
    layouts = dict(layouts or {})
    candidates = named_modules(frozen, layouts, module_name, True)
    linear = None
    if peft_rules.is_all_linear(peft.get("target_modules")):
        every = LoraConfig(target_modules=peft_rules.ALL_LINEAR, layouts=layouts)
        linear = {t.path for t in find_targets(frozen, every)}
    chosen, ranks, alphas = _adapted_modules(peft, candidates, source, linear)
    saved = _saved_modules(
        list(peft_rules.saved_modules(peft.get("modules_to_save"), peft.get("task_type"))),
        named_modules(frozen, layouts, module_name, False),
    )
    known = [module for module, _ in candidates]
    rule = paths.matches_name
    init = peft.get("init_lora_weights", True)
    return LoraConfig(
        r=peft.get("r", 8),
        lora_alpha=peft.get("lora_alpha", 8),
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
