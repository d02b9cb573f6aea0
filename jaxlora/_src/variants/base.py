"""The interface of a LoRA variant, and the registry that tells which variant a module of Θ runs.

A variant (plain LoRA, DoRA, ...) is one :class:`Variant` object: the leaves it adds to an adapted
module of Θ beside ``lora_a`` / ``lora_b`` (:attr:`Variant.extra_leaves`), their initial values,
how the module folds into its kernel and back, its factored forward, and the extra tensors of its
PEFT file. ``jaxlora.split(..., variant=name)`` makes an adapter of a registered variant;
``merge``, ``unmerge``, ``apply`` and the PEFT files find each module's variant from the leaves it
holds (:func:`variant_of`), so a new variant is one new module registered in
:mod:`jaxlora._src.variants` and no change anywhere else.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from jaxlora._src import validate
from jaxlora._src.config.lora_config import LoraConfig
from jaxlora._src.config.targets import BIAS, EMBEDDING, KERNEL, Target
from jaxlora._src.types import LORA_A, LORA_B, LoraTree

#: A variant's extra leaves of one module: ``{leaf name: array}``.
Extras = Mapping[str, jax.Array]


class FileEntry(NamedTuple):
    """One extra PEFT tensor of an adapted module: ``<module><suffix>``, Θ's leaf ``leaf`` of
    per-layer ``shape`` stored as ``peft_shape`` (the same elements in C order)."""

    suffix: str
    leaf: str
    shape: tuple[int, ...]
    peft_shape: tuple[int, ...]


class Variant(abc.ABC):
    """One LoRA variant: what its adapted modules hold and how they fold and run.

    Attributes:
        name: the name ``jaxlora.split(..., variant=name)`` takes.
        extra_leaves: Θ leaf names the variant adds beside ``lora_a`` / ``lora_b``; a module
            holding all of them runs this variant.
        fusable: whether the factored output is the plain sum ``layer(x) + s·(x·A)·B`` (so a
            plain ``Dense`` may run as one fused call).
    """

    name: str = ""
    extra_leaves: tuple[str, ...] = ()
    fusable: bool = False

    def check(self, leaf: str, where: str) -> None:
        """Raises ValueError when the variant cannot adapt the weight ``leaf`` (``"kernel"``,
        ``"embedding"``) of the module ``where``; every weight is fine by default."""
        del leaf, where

    @abc.abstractmethod
    def init(self, target: Target, weight: jax.Array, config: LoraConfig) -> dict[str, Any]:
        """The extra leaves of a fresh adapter for ``target`` (kernel ``weight``), in
        ``config.dtype``; ``{}`` for a variant without extra leaves."""

    @abc.abstractmethod
    def merge(
        self, weight, a, b, extras: Extras, scale: float, n_stack: int, where: str
    ) -> jax.Array:
        """The kernel with the module folded in, in ``weight``'s dtype."""

    @abc.abstractmethod
    def unmerge(
        self, merged, a, b, extras: Extras, scale: float, n_stack: int, where: str
    ) -> jax.Array:
        """The kernel ``merge`` was given, from the merged one; ValueError when it cannot be."""

    @abc.abstractmethod
    def factored(self, y, term, weight, bias, a, b, extras: Extras, scale: float) -> jax.Array:
        """One adapted layer's output on the factored path.

        Args:
            y: the layer's own output (bias included).
            term: the low-rank term ``s·(drop(x)·A)·B`` in the adapter's dtype.
            weight: the layer's kernel (possibly a ``QuantizedKernel``), for this call's slice.
            bias: the layer's bias, or None.
            a, b, extras: this call's factors and extra leaves.
            scale: the module's LoRA scale.
        """

    def file_entries(self, target: Target) -> tuple[FileEntry, ...]:
        """The extra PEFT tensors of one adapted module (none by default)."""
        return ()


_REGISTRY: dict[str, Variant] = {}
#: Leaf names no variant may add: the factors, and the weights of the modules LoRA adapts or
#: trains (kernels, embedding tables, biases, norm scales).
RESERVED_LEAVES = (LORA_A, LORA_B, KERNEL, EMBEDDING, BIAS, "scale")
BUILT_IN = ("lora", "dora")


def register(variant: Variant) -> Variant:
    """Adds ``variant`` to the variants ``split``, ``merge`` and ``apply`` know; returns it.

    Raises:
        TypeError: when ``variant`` is not a :class:`Variant` instance, its ``name`` not a
            non-empty str, its ``extra_leaves`` a str (not a tuple of names) or not str names,
            its ``fusable`` not a bool.
        ValueError: when its name is taken, its extra leaves repeat a name, use a reserved name
            (``lora_a``, ``lora_b``, ``kernel``, ``embedding``, ``bias``, ``scale``), or are
            another variant's.
    """
    if isinstance(variant, type) and issubclass(variant, Variant):
        raise TypeError(f"`variant` must be a Variant instance; got the class {variant.__name__}, "
                        f"pass {variant.__name__}()")  # fmt: skip
    if not isinstance(variant, Variant):
        raise TypeError(f"`variant` must be a Variant, got {type(variant).__name__}")
    _check_declaration(variant)
    if variant.name in _REGISTRY:
        raise ValueError(f"a variant named `{variant.name}` is registered already; pick a new name")
    for other in _REGISTRY.values():
        if set(variant.extra_leaves) == set(other.extra_leaves):
            raise ValueError(
                f"variant `{variant.name}` has the extra leaves of `{other.name}` "
                f"({other.extra_leaves}); give it leaf names of its own"
            )
    _REGISTRY[variant.name] = variant
    return variant


def _check_declaration(variant: Variant) -> None:
    """``name`` a non-empty str; ``extra_leaves`` a sequence of distinct new leaf names; ``fusable``
    a bool. A leaf that LoRA itself or a base module uses (``lora_b``, ``bias``) would make every
    plain module, or every module with a bias, look like this variant."""
    label = type(variant).__name__
    if not isinstance(variant.name, str) or not variant.name:
        raise TypeError(f"the `name` of variant {label} must be a non-empty str, "
                        f"got {variant.name!r}")  # fmt: skip
    leaves = variant.extra_leaves
    if isinstance(leaves, str | bytes):
        raise TypeError(
            f"`extra_leaves` of variant `{variant.name}` must be a sequence of leaf names, got "
            f"the str {leaves!r} (it would read as its letters); write ({leaves!r},)"
        )
    if not isinstance(leaves, tuple | list) or not all(isinstance(n, str) and n for n in leaves):
        raise TypeError(
            f"`extra_leaves` of variant `{variant.name}` must be a tuple of non-empty str leaf "
            f"names, got {leaves!r}"
        )
    repeated = sorted({n for n in leaves if leaves.count(n) > 1})
    if repeated:
        raise ValueError(f"`extra_leaves` of variant `{variant.name}` repeats {repeated}")
    taken = sorted(set(leaves) & set(RESERVED_LEAVES))
    if taken:
        raise ValueError(
            f"`extra_leaves` of variant `{variant.name}` holds {taken}, a leaf name that LoRA or "
            f"a base module uses (reserved: {list(RESERVED_LEAVES)}); give it names of its own, "
            "e.g. 'lora_<what it is>'"
        )
    if not isinstance(variant.fusable, bool):
        raise TypeError(f"`fusable` of variant `{variant.name}` must be a bool, "
                        f"got {variant.fusable!r}")  # fmt: skip


def unregister(name: str) -> None:
    """Removes the variant ``name`` (a no-op when it is not registered).

    Raises:
        ValueError: for the built-in ``"lora"`` and ``"dora"``: without them plain modules have
            no variant, and a DoRA module would be read as plain LoRA, its magnitudes ignored.
    """
    validate.string("name", name)
    if name in BUILT_IN:
        raise ValueError(f"`name` {name!r} is a built-in variant and cannot be unregistered")
    _REGISTRY.pop(name, None)


def get(name: str) -> Variant:
    """The registered variant ``name``.

    Raises:
        ValueError: naming the registered variants when ``name`` is none of them.

    Example:
        >>> get("dora").extra_leaves
        ('lora_magnitude',)
    """
    if name not in _REGISTRY:
        kind = TypeError if not isinstance(name, str) else ValueError
        raise kind(
            f"`variant` must be one of {sorted(_REGISTRY)}, got {name!r} (the `name` of a "
            "registered variant)"
        )
    return _REGISTRY[name]


def adapter_leaves() -> tuple[str, ...]:
    """Every leaf name an adapted module of Θ may hold: ``lora_a``, ``lora_b`` and each
    registered variant's extra leaves."""
    extra = [n for v in _REGISTRY.values() for n in v.extra_leaves]
    return (LORA_A, LORA_B, *dict.fromkeys(extra))


def variant_of(module: Mapping[str, Any], where: str = "") -> Variant:
    """The variant an adapted module of Θ runs, told from its leaves: the registered variant
    whose extra leaves it holds (the most of them), plain LoRA when it holds none.

    Raises:
        ValueError: when two variants fit equally well.

    Example:
        >>> variant_of({"lora_a": 0, "lora_b": 0, "lora_magnitude": 0}).name
        'dora'
        >>> variant_of({"lora_a": 0, "lora_b": 0}).name
        'lora'
    """
    validate.mapping("module", module)
    validate.string("where", where, nonempty=False)
    fits = [v for v in _REGISTRY.values() if all(n in module for n in v.extra_leaves)]
    most = max(len(v.extra_leaves) for v in fits)
    best = [v for v in fits if len(v.extra_leaves) == most]
    if len(best) > 1:
        raise ValueError(
            f"the adapted module `{where}` fits the variants {sorted(v.name for v in best)}; "
            "keep the leaves of one variant only"
        )
    return best[0]


def variants_in(lora: Mapping[Any, Any]) -> set[str]:
    """The names of the variants the adapted modules of ``lora`` run.

    Example:
        >>> sorted(variants_in({"q": {"lora_a": 0, "lora_b": 0}, "v": {"bias": 0}}))
        ['lora']
    """
    validate.mapping("lora", lora)
    found = set()
    for key, value in lora.items():
        if not isinstance(value, Mapping):
            continue
        if LORA_A in value:
            found.add(variant_of(value, str(key)).name)
        found |= variants_in(value)
    return found


def adapter_variant(lora: LoraTree) -> str:
    """The variant of a whole adapter, as a file format records it: the one variant with extra
    leaves that its modules run, or plain LoRA.

    Raises:
        ValueError: when the modules run two variants with extra leaves.

    Example:
        >>> adapter_variant({"q": {"lora_a": 0, "lora_b": 0, "lora_magnitude": 0}})
        'dora'
    """
    plain = [v.name for v in _REGISTRY.values() if not v.extra_leaves]
    found = variants_in(lora) - set(plain)
    if len(found) > 1:
        raise ValueError(
            f"`lora` mixes the variants {sorted(found)}; an adapter file holds one variant: "
            "split the adapter in two"
        )
    return found.pop() if found else plain[0]
