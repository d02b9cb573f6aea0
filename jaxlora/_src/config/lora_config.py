"""``LoraConfig``: what to adapt and how, with Hugging Face PEFT's field names and meanings."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config import axes_order, peft_layers, peft_rules

_BIAS_MODES = ("none", "all", "lora_only")
_INIT_MODES = (True, False, "gaussian")
#: Supported kernel layouts (see :mod:`jaxlora._src.config.axes_order`).
LAYOUT_PATTERN = axes_order.LAYOUT_PATTERN


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable, ordered mapping (so a config can be a static jit argument)."""

    def __init__(self, items: Mapping[str, Any] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)


def _names(field: str, value: Any, allow_regex: bool) -> str | tuple[str, ...] | None:
    """Normalises a module-name field: None, a regex string (when allowed) or a tuple of names."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return (value,)
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"`{field}`={value!r} is not a valid regular expression: {err}"
            ) from None
        return value
    if not isinstance(value, Sequence | set | frozenset) or not all(
        isinstance(v, str) and v for v in value
    ):
        raise TypeError(
            f"`{field}` must be a string (regex) or a list of non-empty module names, got {value!r}"
        )
    if not value:
        raise ValueError(f"`{field}` is an empty list; give at least one module name or None")
    return tuple(value)


def _pattern_map(field: str, value: Any, check: Any) -> FrozenMap:
    if value is None:
        return FrozenMap()
    if not isinstance(value, Mapping):
        raise TypeError(f"`{field}` must be a dict of pattern -> value, got {type(value).__name__}")
    for pattern, item in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"`{field}` keys must be non-empty strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{field}` key {pattern!r} is not a valid regex: {err}") from None
        check(f"`{field}[{pattern!r}]`", item)
    return FrozenMap(value)


def _check_rank(where: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where} must be a positive int (the LoRA rank), got {r!r}")


def _check_alpha(where: str, alpha: Any) -> None:
    number = not isinstance(alpha, bool) and isinstance(alpha, int | float)
    if not number or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"{where} must be a finite number > 0 (the LoRA alpha: the update is scaled by "
            "alpha / r, so 0 never trains and a negative or infinite alpha is a mistake; PEFT's "
            f"usual choice is alpha = r or 2·r), got {alpha!r}"
        )


def require_config(config: Any, where: str) -> None:
    """A TypeError unless ``config`` is a :class:`LoraConfig` (``where`` names the caller)."""
    if not isinstance(config, LoraConfig):
        hint = (
            " build it with `jaxlora.LoraConfig(**config)` or `LoraConfig.from_dict(config)`;"
            if isinstance(config, Mapping)
            else ""
        )
        raise TypeError(
            f"`config` must be a jaxlora.LoraConfig (in `{where}`), got {type(config).__name__};"
            f"{hint} pass the config the adapter was made with"
        )


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA; field names and meanings follow PEFT's ``LoraConfig``.

    Attributes:
        r: the rank of every update, unless ``rank_pattern`` says otherwise.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout rate on the LoRA input; only the factored forward path applies it.
        bias: which biases train: ``"none"``, ``"all"``, or ``"lora_only"`` (those of adapted
            modules).
        target_modules: a list of module names, each matched exactly or as a ``/``-suffix of the
            module path; or a string, a regex full-matched against the ``/``-joined module path;
            or ``"all-linear"``: every dense kernel except the output embedding (the LM head, found
            as :func:`jaxlora._src.config.peft_rules.output_embeddings` says).
        exclude_modules: modules never adapted; same rules as ``target_modules``.
        modules_to_save: modules trained in full (e.g. a new classifier head), list rules. A module
            inside one is never adapted, even when ``target_modules`` names it (as in PEFT).
        rank_pattern: ``{pattern: rank}`` overrides; a pattern matches a module path exactly, as a
            suffix, or as a regex over such a suffix. A pattern that matches no target is an error.
        alpha_pattern: ``{pattern: alpha}`` overrides, same rules as ``rank_pattern``.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        init_lora_weights: ``True`` (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r²),
            B zero) or ``False`` (both random: the adapter is not a no-op, for debugging).
        task_type: PEFT's task type; ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` also train the heads
            ``classifier`` / ``score`` in full, ``"QUESTION_ANS"`` the head ``qa_outputs`` (as if
            in ``modules_to_save``, but a head the model lacks is no error).
        dtype: dtype of the adapter factors Θ.
        layouts: ``{pattern: layout}`` stating how a kernel's axes split, for kernels whose shape
            alone is ambiguous (N-D ``DenseGeneral`` / ``Einsum``, ``Conv``, scanned stacks): one
            letter per kernel axis, leading stacked ``s`` axes, then window ``w``, input ``i``
            and output ``o`` axes in any order (``"oio"`` for an einsum kernel
            ``(heads, d_model, head_dim)``). The factors keep the canonical order whatever the
            layout: ``lora_a`` is stack + window + input + ``(r,)``, ``lora_b`` stack + ``(r,)``
            + output. See :func:`jaxlora.infer_layouts`.
        layers_to_transform: a layer index or a list of them: a module that a ``target_modules``
            name matches as a suffix is adapted only in these layers. The index is read off the
            path (``model/layers/3/q_proj`` or linen's ``layer_3/q_proj``). Needs a list
            ``target_modules``.
        layers_pattern: the name (a regex) of the module list whose index counts, e.g.
            ``"layers"`` or ``["h", "block"]``; by default any list's index, as in PEFT.

    Example:
        >>> import jaxlora
        >>> config = jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
        >>> config.scale_for("encoder/query")
        2.0
        >>> jaxlora.LoraConfig.from_json(config.to_json()) == config
        True
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    modules_to_save: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=FrozenMap)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=FrozenMap)
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    task_type: str | None = None
    dtype: str = "float32"
    layouts: Mapping[str, str] = dataclasses.field(default_factory=FrozenMap)
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        _check_rank("`r`", self.r)
        _check_alpha("`lora_alpha`", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float):
            raise TypeError(f"`lora_dropout` must be a float in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= self.lora_dropout < 1.0:  # also False for NaN
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"`bias` must be one of {_BIAS_MODES}, got {self.bias!r}")
        set_("target_modules", _names("target_modules", self.target_modules, True))
        set_("exclude_modules", _names("exclude_modules", self.exclude_modules, True))
        set_("modules_to_save", _names("modules_to_save", self.modules_to_save, False))
        set_("rank_pattern", _pattern_map("rank_pattern", self.rank_pattern, _check_rank))
        set_("alpha_pattern", _pattern_map("alpha_pattern", self.alpha_pattern, _check_alpha))
        set_("layouts", _pattern_map("layouts", self.layouts, axes_order.check_layout))
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"`use_rslora` must be a bool, got {self.use_rslora!r}")
        if not any(self.init_lora_weights is m or self.init_lora_weights == m for m in _INIT_MODES):
            raise ValueError(
                "`init_lora_weights` must be True, False or 'gaussian', "
                f"got {self.init_lora_weights!r}"
            )
        peft_rules.check_task_type(self.task_type)
        set_("layers_to_transform", peft_layers.check_layers_to_transform(self.layers_to_transform))
        set_("layers_pattern", peft_layers.check_layers_pattern(self.layers_pattern))
        peft_layers.check_layer_fields(
            self.target_modules, self.layers_to_transform, self.layers_pattern
        )
        if self.dtype is None:
            raise TypeError("`dtype` must name a floating dtype (e.g. 'float32'), got None")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"`dtype` must name a floating dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"`dtype` must name a floating dtype, got {self.dtype!r}")
        set_("dtype", dtype.name)

    def rank_for(self, module_path: str) -> int:
        """The rank of the update for ``module_path`` (``rank_pattern`` first, then ``r``)."""
        validate.string("module_path", module_path, nonempty=False)
        found = paths.first_match(self.rank_pattern, module_path)
        return self.r if found is None else found[1]

    def alpha_for(self, module_path: str) -> float:
        """The alpha for ``module_path`` (``alpha_pattern`` first, then ``lora_alpha``)."""
        validate.string("module_path", module_path, nonempty=False)
        found = paths.first_match(self.alpha_pattern, module_path)
        return self.lora_alpha if found is None else found[1]

    def scale_for(self, module_path: str, rank: int | None = None) -> float:
        """The factor s in W + s·A·B: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        rank = self.rank_for(module_path) if rank is None else validate.positive_int("rank", rank)
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise TypeError(
                "`data` of `LoraConfig.from_dict` must be a dict of config fields (as `to_dict` "
                f"returns), got {type(data).__name__}"
            )
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string (it travels with every saved adapter)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        """Reads a config written by :meth:`to_json`."""
        if not isinstance(text, str | bytes | bytearray):
            raise TypeError(
                f"`text` of `LoraConfig.from_json` must be the JSON text (a str), got "
                f"{type(text).__name__}"
            )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`text` of `LoraConfig.from_json` is not valid JSON ({err}); pass the string "
                "`LoraConfig.to_json` wrote"
            ) from None
        return cls.from_dict(data)


# The config is static metadata: it can be passed straight to a jitted function.
jax.tree_util.register_static(LoraConfig)
