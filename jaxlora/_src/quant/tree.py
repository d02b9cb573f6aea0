"""Quantised params trees: quantise the selected kernels, dequantise, split, merge, requantise.

LoRA trains only Θ, so the frozen base can be stored in fewer bits (QLoRA, Dettmers et al., 2023).
:func:`quantize` replaces selected kernels of a params tree by
:class:`~jaxlora.quant.QuantizedKernel` leaves; :func:`dequantize_tree` turns them back into
float arrays inside a jitted loss. Gradients are taken w.r.t. Θ only
(``jax.grad(loss)(lora, frozen, batch)``). Merging into a quantised base (:func:`merge_quantized`,
then :func:`requantize`) is lossy; :func:`requantization_error` measures it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from jaxlora._src import paths, validate
from jaxlora._src.config.lora_config import LoraConfig, require_config
from jaxlora._src.config.targets import find_targets
from jaxlora._src.quant.dequantize import dequantize_tree
from jaxlora._src.quant.kernel import (
    check_options,
    is_quantized,
    quantize_kernel,
    quantize_q4_1,
)
from jaxlora._src.tree import core
from jaxlora._src.types import LoraTree, Params, PRNGKey


def shapes(params: Params) -> Params:
    """``params`` with each :class:`QuantizedKernel` replaced by a ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def quantize(
    params: Params,
    targets: LoraConfig | str | Sequence[str] = "all-linear",
    method: str = "nf4",
    block_size: int | None = None,
    double_quant: bool = False,
) -> Params:
    """Replaces the selected kernels of ``params`` by :class:`QuantizedKernel` leaves.

    Args:
        params: float params (a nested dict, ``nnx.State``, an Equinox module or any other
            params pytree; the rest of the tree is returned as it is).
        targets: which kernels: a ``LoraConfig`` (its targets and layouts) or a
            ``target_modules`` value (list of names, regex, or ``"all-linear"``, the default,
            which like QLoRA quantises every dense kernel except the output head).
        method: ``"int8"``, ``"nf4"`` or ``"q4_1"``.
        block_size: elements per absmax block for NF4 (default 64; Q4_1 blocks are always 32).
        double_quant: store NF4 absmax values as int8 too (NF4 only).

    Returns:
        ``params`` with the chosen kernels quantised. Split the adapter with
        :func:`split_quantized` (or split the float params first, then quantise the frozen tree).

    Raises:
        ValueError: for an unknown ``method``, a bad ``block_size``, targets matching nothing, or
            a chosen kernel holding NaN or infinity.
        TypeError: for a ``double_quant`` that is no bool, or a kernel that is no array.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"q": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}
        >>> qparams = quantize(params, ["q"], "nf4")
        >>> type(qparams["q"]["kernel"]).__name__, qparams["q"]["kernel"].nbytes
        ('QuantizedKernel', 2304)
    """
    validate.pytree("params", params)
    if not isinstance(targets, LoraConfig | str):
        validate.str_sequence("targets", targets, nonempty=True)
    elif isinstance(targets, str):
        validate.string("targets", targets)
    check_options(method, block_size, double_quant)
    config = targets if isinstance(targets, LoraConfig) else LoraConfig(target_modules=targets)
    _check_kernels(params)
    chosen = {t.keys + (t.leaf,): t.layout for t in find_targets(params, config, caller="quantize")}

    def convert(keys, names, leaf):
        if keys not in chosen:
            return leaf
        if not isinstance(leaf, jax.core.Tracer) and not bool(jnp.isfinite(leaf).all()):
            raise ValueError(
                f"`params` kernel `{paths.join(names)}` holds NaN or infinity, which cannot be "
                "quantised (every block would turn NaN); fix the weights before `quantize`"
            )
        return quantize_kernel(leaf, method, chosen[keys], block_size, double_quant)

    return paths.map_with_keys(convert, params)


def _check_kernels(params: Params) -> None:
    """A TypeError naming the first ``kernel`` / ``embedding`` that is a Python list or tuple."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), params)]
    while stack:
        keys, node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            if key in ("kernel", "embedding") and isinstance(value, list | tuple):
                raise TypeError(
                    f"`params` leaf `{paths.join(keys + (str(key),))}` is a "
                    f"{type(value).__name__}, not an array; convert it with `jnp.asarray`"
                )
            stack.append((keys + (str(key),), value))


def requantize(params: Params, like: Params) -> Params:
    """Quantises the leaves of float ``params`` where ``like`` holds a :class:`QuantizedKernel`,
    with the same method, block size, double quantisation and layout."""

    def convert(leaf, ref):
        if not is_quantized(ref):
            return leaf
        if ref.method == "q4_1":
            return quantize_q4_1(leaf, ref.layout, ref.transposed)
        return quantize_kernel(
            leaf, ref.method, ref.layout, ref.block_size or 64, ref.scale_scale is not None
        )

    validate.pytree("params", params)
    validate.pytree("like", like)
    try:
        return jax.tree.map(convert, params, like, is_leaf=is_quantized)
    except ValueError as err:
        if "structure" not in str(err):
            raise
        raise ValueError(
            "`params` and `like` must have the same tree structure (`like` the quantised base "
            f"that `params` was merged from): {err}"
        ) from None


def split_quantized(params: Params, config: LoraConfig, key: PRNGKey) -> tuple[Params, LoraTree]:
    """:func:`jaxlora.split` for params whose kernels are quantised: ``(frozen, lora)``, with
    ``frozen`` the quantised ``params`` themselves.

    Raises:
        ValueError: when a trainable copy (``modules_to_save``) would be a quantised kernel.
    """
    validate.pytree("params", params)
    require_config(config, "split_quantized")
    view = shapes(params)
    for _, names, leaf in paths.flatten(view):
        if isinstance(leaf, jax.ShapeDtypeStruct) and config.modules_to_save:
            if any(
                paths.matches_literal(n, paths.join(names[:-1])) for n in config.modules_to_save
            ):
                raise ValueError(
                    f"`modules_to_save` takes the quantised kernel `{paths.join(names)}`; a "
                    "module trained in full must stay in float: leave it out of `quantize`"
                )
    return params, core.split(view, config, key)[1]


def merge_quantized(qfrozen: Params, lora: LoraTree, config: LoraConfig) -> Params:
    """``jaxlora.merge``, which dequantises a quantised base: float params ``dequant(W) + s·A·B``
    (each module through its variant). Kept as a name for QLoRA code.

    Use it inside the jitted loss for QLoRA training on the merged path; pass the result to
    :func:`requantize` to store the merged model quantised again (lossy: see
    :func:`requantization_error`).
    """
    validate.pytree("qfrozen", qfrozen)
    return core.merge(qfrozen, lora, config)


def requantization_error(
    frozen: Params, lora: LoraTree, config: LoraConfig
) -> dict[str, dict[str, float]]:
    """What merging then requantising loses, per quantised adapted kernel.

    Returns:
        ``{module path: {"weight": ‖Q(W') − W'‖ / ‖W'‖, "update": ‖Q(W') − W − sΔW‖ / ‖sΔW‖}}``
        with ``W`` the dequantised base and ``W' = W + sΔW`` the float merge.
    """
    base = dequantize_tree(frozen)
    merged = core.merge(base, lora, config)
    again = dequantize_tree(requantize(merged, frozen))
    # By joined path, not by dict keys: an Equinox module's weights are attributes.
    trees = [paths.by_path(t) for t in (base, merged, again)]
    adapted = {p.rsplit("/", 1)[0] for p in paths.by_path(lora)}
    out = {}
    for _, names, leaf in paths.flatten(shapes(frozen)):
        if not isinstance(leaf, jax.ShapeDtypeStruct) or paths.join(names[:-1]) not in adapted:
            continue
        w, w2, q = (np.asarray(t[paths.join(names)], np.float64) for t in trees)
        update = np.linalg.norm(w2 - w)
        out[paths.join(names[:-1])] = {
            "weight": float(np.linalg.norm(q - w2) / np.linalg.norm(w2)),
            "update": float(np.linalg.norm(q - w - (w2 - w)) / update) if update else 0.0,
        }
    return out
