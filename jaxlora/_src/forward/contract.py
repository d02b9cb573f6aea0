"""Contractions with an adapted weight, factored: ``x·W + s·(x·A)·B`` without forming ΔW.

Each rule takes the equation's parameters, the plain operand ``x`` and the
:class:`~jaxlora._src.forward.lazy_weight.LazyWeight`, and returns the output, or None where the
low-rank form would not be cheap (the contraction spans both A's and B's axes, a grouped
convolution, ...): the caller then folds the weight (``W + s·A·B``) and runs the op as it is.

The side of ΔW that ``x`` contracts is read off the contraction: contracting A's axes gives
``(x·A)·B`` (a dense layer), contracting B's gives ``(x·Bᵀ)·Aᵀ`` (a weight stored as (out, in)
and used transposed, or a tied output head); either way the rank-r intermediate is the one
tensor formed, scaled there since it is the smallest. As on the Flax path the low-rank term runs
in the factors' dtype with the op's precision and is cast to the output's dtype before the add,
and LoRA dropout (:mod:`~jaxlora._src.forward.lora_dropout`) acts on its input only.
A plain dense contraction (``x``'s trailing axes against the view's input axes, an ``(in, out)``
kernel or an ``(out, in)`` weight, on either side of the op) runs as one
:func:`~jaxlora._src.forward.fused.dense`, whose backward is a few 2-D GEMMs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.forward import fused, lora_dropout
from jaxlora._src.forward.lazy_weight import RANK, LazyWeight, einsum, fresh


def _dense(w: LazyWeight, x: jax.Array, contract, batch, precision, preferred, w_left) -> Any:
    """The fused call for ``x``'s trailing axes against ``w``'s input axes, ``(..., out)`` (with
    ``x``'s free axes first), or None. The input axes are ``w``'s leading axes (an ``(in, out)``
    kernel) or its trailing ones (an ``(out, in)`` weight, contracted as stored)."""
    (x_c, w_c), (x_b, _) = contract, batch
    n = len(w_c)
    if x_b or not fused.enabled() or n == 0 or w.a.dtype != w.b.dtype or x.dtype != w.dtype:
        return None
    if tuple(x_c) != tuple(range(x.ndim - n, x.ndim)):
        return None
    out_first = tuple(w_c) != tuple(range(n))
    if out_first and tuple(w_c) != tuple(range(len(w.labels) - n, len(w.labels))):
        return None
    ins, outs = (w.labels[-n:], w.labels[:-n]) if out_first else (w.labels[:n], w.labels[n:])
    if w.a_labels != ins + (RANK,) or w.b_labels != (RANK,) + outs:
        return None
    if preferred is not None and jnp.dtype(preferred) != x.dtype:
        return None
    stored = w.weight
    narrow = jnp.issubdtype(stored.dtype, jnp.floating) and stored.dtype.itemsize < x.itemsize
    kernel = stored if narrow else w.base()
    keep, rate = lora_dropout.keep_mask(x.shape), lora_dropout.rate()
    return fused.trailing_dense(x, kernel, None, w.a, w.b, keep, w.scale, rate, precision, n,
                                out_first, w_left)  # fmt: skip


def dot_general(params: dict[str, Any], lhs: Any, rhs: Any) -> jax.Array | None:
    """A ``dot_general`` with one adapted operand (a :class:`LazyWeight`), factored."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = params["dimension_numbers"]
    precision, preferred = params.get("precision"), params.get("preferred_element_type")
    w_left = isinstance(lhs, LazyWeight)
    w, x = (lhs, rhs) if w_left else (rhs, lhs)
    w_c, x_c = (lhs_c, rhs_c) if w_left else (rhs_c, lhs_c)
    w_b, x_b = (lhs_b, rhs_b) if w_left else (rhs_b, lhs_b)
    out = _dense(w, x, (x_c, w_c), (x_b, w_b), precision, preferred, w_left)
    if out is not None:  # (x's free axes, w's): the other way round when w is the left operand
        lead = x.ndim - len(x_c)
        return out if not w_left else jnp.moveaxis(out, tuple(range(lead)), tuple(range(-lead, 0)))
    x_labels = [fresh() for _ in range(x.ndim)]
    for xa, wa in zip(tuple(x_c) + tuple(x_b), tuple(w_c) + tuple(w_b), strict=True):
        x_labels[xa] = w.labels[wa]
    summed = {w.labels[k] for k in w_c}
    batch = [w.labels[k] for k in w_b]
    lhs_labels = w.labels if w_left else tuple(x_labels)
    rhs_labels = tuple(x_labels) if w_left else w.labels
    free = lambda labels, dims: [lab for k, lab in enumerate(labels) if k not in dims]  # noqa: E731
    out_labels = tuple(
        batch + free(lhs_labels, (*lhs_c, *lhs_b)) + free(rhs_labels, (*rhs_c, *rhs_b))
    )
    term = _term(w, x, tuple(x_labels), summed, out_labels, precision)
    if term is None:
        return None
    y = lax.dot_general_p.bind(*((w.base(), x) if w_left else (x, w.base())), **params)
    return y + term.astype(y.dtype)


def _term(w: LazyWeight, x, x_labels, summed, out_labels, precision) -> jax.Array | None:
    """``s·einsum(x, A, B)`` through the rank-r intermediate, or None when ``x`` contracts axes
    of both A and B (the intermediate would not be small)."""
    a_only = {lab for lab in summed if w.kind(lab) == "in"}
    b_only = {lab for lab in summed if w.kind(lab) == "out"}
    if a_only and b_only:
        return None
    (first, f_labels), (second, s_labels) = (
        ((w.b, w.b_labels), (w.a, w.a_labels)) if b_only else ((w.a, w.a_labels), (w.b, w.b_labels))
    )
    keep = set(s_labels) | set(out_labels)
    h_labels = tuple(dict.fromkeys(lab for lab in x_labels + f_labels if lab in keep))
    x_lora = fused.apply_mask(x.astype(first.dtype), lora_dropout.keep_mask(x.shape),
                              lora_dropout.rate())  # fmt: skip
    h = einsum((x_lora, x_labels), (first, f_labels), out=h_labels, precision=precision)
    h = h * jnp.asarray(w.scale, h.dtype)
    return einsum((h, h_labels), (second, s_labels), out=out_labels, precision=precision)


def conv(params: dict[str, Any], lhs: Any, rhs: Any) -> jax.Array | None:
    """A ``conv_general_dilated`` whose kernel is adapted, factored as PEFT's conv LoRA: A as a
    convolution to r channels, then B as a 1×1 projection; None where that does not apply."""
    if isinstance(lhs, LazyWeight) or not isinstance(rhs, LazyWeight):
        return None
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    w, x = rhs, lhs
    _, rhs_spec, out_spec = params["dimension_numbers"]
    out_label = w.labels[rhs_spec[0]]
    others = [lab for k, lab in enumerate(w.labels) if k != rhs_spec[0]]
    if w.b_labels != (RANK, out_label) or any(w.kind(lab) != "in" for lab in others):
        return None
    kernel_labels = tuple(RANK if k == rhs_spec[0] else lab for k, lab in enumerate(w.labels))
    a_kernel = w.a.transpose([w.a_labels.index(lab) for lab in kernel_labels])
    y = lax.conv_general_dilated_p.bind(x, w.base(), **params)
    lora_params = dict(params, preferred_element_type=None)
    x_lora = fused.apply_mask(x.astype(a_kernel.dtype), lora_dropout.keep_mask(x.shape),
                              lora_dropout.rate())  # fmt: skip
    h = lax.conv_general_dilated_p.bind(x_lora, a_kernel, **lora_params)
    h = h * jnp.asarray(w.scale, h.dtype)
    term = jnp.moveaxis(jnp.tensordot(h, w.b, axes=((out_spec[1],), (0,))), -1, out_spec[1])
    return y + term.astype(y.dtype)
