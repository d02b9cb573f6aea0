"""Checks that every module a ``LoraConfig`` names exists and is a kernel LoRA can adapt.

PEFT raises only when *no* module matches ``target_modules``, so a typo beside a good name
(``["up", "dwon"]``) silently adapts less than asked. Here each list entry must name at least one
adaptable kernel, and an adapted kernel must be floating point: ``W + s·A·B`` cast back to an
integer or bool dtype would truncate the update. A module whose 2+-D weights have other names (a
recurrent cell's ``weight_ih`` / ``weight_hh``) named by an entry or a regex gets the reason.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from jaxlora._src import paths, validate
from jaxlora._src.config.conventions import WEIGHT_LEAVES
from jaxlora._src.config.peft_rules import ALL_LINEAR
from jaxlora._src.types import Params


def _leaf_names(params: Params) -> dict[str, list[str]]:
    """``{module path: [its leaf names]}`` for every module of ``params`` that holds leaves."""
    modules: dict[str, list[str]] = {}
    for _, names, _ in paths.flatten(params):
        if names:
            modules.setdefault(paths.join(names[:-1]), []).append(names[-1])
    return modules


def unadaptable_weights(params: Params) -> dict[str, list[str]]:
    """``{module path: [names]}`` of the 2+-D ``weight_*`` leaves LoRA does not adapt: an RNN
    cell's ``weight_ih`` / ``weight_hh`` (Equinox's ``GRUCell``, ``LSTMCell``). Stacked scales
    and biases are no such weights; the parts of a weight stored as a pytree (a quantised
    kernel's ``codes``) are the weight's."""
    modules: dict[str, list[str]] = {}
    for _, names, leaf in paths.flatten(params):
        if not names or names[-1] in WEIGHT_LEAVES or len(getattr(leaf, "shape", ())) < 2:
            continue
        if not names[-1].startswith("weight_"):
            continue
        if not any(n in WEIGHT_LEAVES for n in names[:-1]):
            modules.setdefault(paths.join(names[:-1]), []).append(names[-1])
    return modules


def why_unadaptable(found: dict[str, list[str]]) -> str:
    """Why the modules of :func:`unadaptable_weights` cannot take LoRA, and what to do instead."""
    listing = ", ".join(f"`{m}` ({', '.join(sorted(n))})" for m, n in list(found.items())[:6])
    return (
        f"the 2+-D weights of {listing} have names LoRA does not adapt: it adapts one "
        "'kernel', 'embedding' or 'weight' leaf per module, and a recurrent cell that keeps its "
        "input and hidden weights in one module (Equinox's GRUCell / LSTMCell: `weight_ih`, "
        "`weight_hh`) has none. Write the cell with one Linear per weight (e.g. `input_gates`, "
        "`hidden_gates`) and name those, or train the cell in full with `modules_to_save`"
    )


def _names_cell(entry: str, module: str, names: Sequence[str]) -> bool:
    """Whether the list entry names the module or one of its unadaptable weights."""
    return any(paths.matches_literal(entry, p) for p in [module, *(f"{module}/{n}" for n in names)])


def _why_not(
    entry: str,
    modules: dict[str, list[str]],
    kernel_paths: Sequence[str],
    unadaptable: dict[str, list[str]],
) -> str:
    """Why the ``target_modules`` entry ``entry`` names no adaptable kernel, with a suggestion."""
    hits = [m for m in modules if paths.matches_literal(entry, m)]
    cells = {m: n for m, n in unadaptable.items() if _names_cell(entry, m, n)}
    if cells:
        return why_unadaptable(cells)
    if hits:
        leaves = sorted({n for m in hits for n in modules[m]})
        return (
            f"`{hits[0]}` holds only {leaves}, no 2+-D 'kernel' or 'embedding' for LoRA to "
            "adapt (a norm or bias-only module); drop it from `target_modules` or train it in "
            "full with `modules_to_save`"
        )
    inner = [p for p in kernel_paths if f"/{entry}/" in f"/{p}/"]
    if inner:
        return (
            f"it is a module holding the kernels {paths.preview(inner, 6)}, not a kernel itself; "
            "name those layers (their last path segment) instead"
        )
    names = sorted({p.rsplit("/", 1)[-1] for p in kernel_paths} | set(kernel_paths))
    close = difflib.get_close_matches(entry, names, n=3, cutoff=0.6)
    return f"did you mean {close}?" if close else "no module of that name"


def check_target_entries(config: Any, params: Params, kernel_paths: Sequence[str]) -> None:
    """Raises a ValueError naming each list entry of ``target_modules`` that matches no kernel.

    A regex is one pattern and already fails when it matches nothing, as does a list none of
    whose names exists anywhere (:func:`peft_rules.select`); here a regex is refused only when it
    matches no kernel but does match a module holding weights under other names.
    ``kernel_paths`` are the module paths holding an adaptable kernel or embedding.
    """
    spec = config.target_modules
    if isinstance(spec, str) and spec != ALL_LINEAR:
        _check_target_regex(spec, params, kernel_paths)
    if spec is None or isinstance(spec, str):
        return
    unmatched = [n for n in spec if not any(paths.matches_literal(n, p) for p in kernel_paths)]
    if not unmatched:
        return
    modules = _leaf_names(params)
    unadaptable = unadaptable_weights(params)

    def exists(entry: str) -> bool:  # as a module, a module's ancestor, or a cell's weight
        return any(
            paths.matches_literal(entry, m) or f"/{entry}/" in f"/{m}/" for m in modules
        ) or any(_names_cell(entry, m, names) for m, names in unadaptable.items())

    if len(unmatched) == len(spec) and not any(exists(n) for n in spec):
        return  # plain names that exist nowhere: `peft_rules.select`'s "no module matched"
    reasons = "; ".join(
        f"{n!r}: {_why_not(n, modules, kernel_paths, unadaptable)}" for n in unmatched
    )
    raise ValueError(
        f"no module matched `target_modules` entries {unmatched} ({reasons}). Every entry must "
        f"name at least one adaptable kernel; modules with kernels: {paths.preview(kernel_paths)}"
    )


def _check_target_regex(spec: str, params: Params, kernel_paths: Sequence[str]) -> None:
    """A regex that matches no kernel but does match a module whose weights LoRA cannot adapt
    (a recurrent cell) is refused with the reason, not only "no module matched"."""
    if any(re.fullmatch(spec, p) for p in kernel_paths):
        return
    cells = {m: n for m, n in unadaptable_weights(params).items() if re.fullmatch(spec, m)}
    if cells:
        raise ValueError(
            f"no module matched `target_modules`={spec!r}: {why_unadaptable(cells)}. Modules "
            f"with kernels: {paths.preview(kernel_paths)}"
        )


def is_float_kernel(dtype: Any) -> bool:
    """Whether a kernel of ``dtype`` can take a LoRA update (floating point only)."""
    return validate.is_floating(dtype)


def check_float_targets(chosen: Sequence[Any]) -> None:
    """Raises a ValueError when a chosen kernel (``path``, ``leaf``, ``dtype``) is not float."""
    bad = [c for c in chosen if not is_float_kernel(c.dtype)]
    if bad:
        listing = ", ".join(f"`{c.path}` ({c.leaf}, {jnp.dtype(c.dtype).name})" for c in bad[:8])
        raise ValueError(
            f"`target_modules` selects integer or bool weights {listing}; W + s·A·B cast back "
            "to that dtype would truncate the update. Adapt floating-point kernels only: remove "
            "them from `target_modules` or add them to `exclude_modules` (a quantised base is "
            "quantised after `split`, see `jaxlora.quant`)"
        )
