"""An adapted weight seen through a function's layout ops, never read without its update.

:func:`jaxlora.factored` follows each adapted weight through the function it transforms. Until it
meets a contraction, the weight is a :class:`LazyWeight`: the base weight's current *view* (after
the transposes, relabelling reshapes, slices and casts the function applied to it) together with
the factors A and B, each axis of the view, of A and of B named by an integer label. A label held
by A alone is an input axis of ΔW, by B alone an output axis, by both a stacked axis; the rank is
label :data:`RANK`. So ``view + s·einsum(A, B -> view labels)`` is, at every step, exactly the
merged weight seen through the same ops, and a view op on it is an op on whichever factor holds
the axis: slicing layer ``i`` of a stack slices both factors, transposing only renames.

Where a view op cannot be followed (``None`` from the op), the caller folds the weight instead
(:meth:`LazyWeight.merged`): the function then sees ``W + s·A·B``, never the bare W.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.config import axes_order
from jaxlora._src.types import LETTERS

#: The label of the rank axis, shared by A (its last axis at first) and B.
RANK = 0
_FRESH = itertools.count(1)


def fresh() -> int:
    """A label used nowhere else."""
    return next(_FRESH)


@dataclasses.dataclass(frozen=True)
class LazyWeight:
    """``weight + scale·einsum(a, b)`` with named axes; see the module docstring.

    Attributes:
        weight: the base weight's view, in its stored dtype.
        a, b: the factors, axes named by ``a_labels`` / ``b_labels``.
        labels: one label per axis of ``weight``.
        scale: the module's ``s``.
        dtype: the dtype the function sees (a cast is deferred so the fold happens first).
        where: the module path, for messages.
    """

    weight: jax.Array
    a: jax.Array
    b: jax.Array
    labels: tuple[int, ...]
    a_labels: tuple[int, ...]
    b_labels: tuple[int, ...]
    scale: float
    dtype: Any
    where: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def kind(self, label: int) -> str:
        """``"stack"`` (in A and B), ``"in"`` (A only) or ``"out"`` (B only)."""
        in_a, in_b = label in self.a_labels, label in self.b_labels
        return "stack" if in_a and in_b else ("in" if in_a else "out")

    def merged(self) -> jax.Array:
        """The view of ``W + s·A·B``, folded as :func:`jaxlora.merge` folds it (float32, cast to
        W's dtype), then cast to the dtype the function sees."""
        delta = einsum((self.a, self.a_labels), (self.b, self.b_labels), out=self.labels,
                       precision=lax.Precision.HIGHEST, dtype=jnp.float32)  # fmt: skip
        folded = self.weight.astype(jnp.float32) + self.scale * delta
        return folded.astype(self.weight.dtype).astype(self.dtype)

    def base(self) -> jax.Array:
        """The base view in the dtype the function sees: only for the ``x·W`` half of a
        contraction whose low-rank half is added beside it."""
        return self.weight.astype(self.dtype)

    # View ops: each returns the new LazyWeight, or None when it cannot be followed.

    def transpose(self, perm: tuple[int, ...]) -> LazyWeight:
        return self._with(lax.transpose(self.weight, perm), tuple(self.labels[p] for p in perm))

    def astype(self, dtype: Any) -> LazyWeight:
        return dataclasses.replace(self, dtype=np.dtype(dtype))

    def squeeze(self, dims: tuple[int, ...]) -> LazyWeight:
        out = self
        for label in (self.labels[d] for d in dims):
            out = out._drop_label(label)
        kept = tuple(lab for k, lab in enumerate(self.labels) if k not in dims)
        return out._with(lax.squeeze(self.weight, dims), kept)

    def slice(self, starts: tuple[Any, ...], sizes: tuple[int, ...]) -> LazyWeight:
        """The view ``weight[starts : starts + sizes]`` (starts may be traced)."""
        out, weight = self, self.weight
        for axis, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            if size == self.shape[axis]:
                continue
            label = self.labels[axis]
            weight = lax.dynamic_slice_in_dim(weight, start, size, axis)
            cut = functools.partial(_slice_axis, start=start, size=size)
            out = out._map_factors(label, cut)
        return out._with(weight, self.labels)

    def reshape(self, new_shape: tuple[int, ...]) -> LazyWeight | None:
        """The view reshaped, where the reshape only splits or joins axes of one factor (or
        keeps an axis as it is) and adds or drops unit axes; None otherwise."""
        groups = reshape_groups(self.shape, tuple(new_shape))
        if groups is None:
            return None
        out, labels = self, []
        for old, new in groups:
            if len(old) == 1 and len(new) == 1:
                labels.append(self.labels[old[0]])
            elif not new:  # a unit axis dropped
                out = out._drop_label(self.labels[old[0]])
            elif not old:  # a unit axis added: an input axis of size 1
                labels.append(fresh())
                out = out._regroup([], labels[-1:], [1])
            else:
                olds = [self.labels[k] for k in old]
                kinds = {out.kind(lab) for lab in olds}
                if len(kinds) != 1 or kinds == {"stack"}:
                    return None
                news = [fresh() for _ in new]
                out = out._regroup(olds, news, [new_shape[k] for k in new])
                labels.extend(news)
        return out._with(self.weight.reshape(new_shape), tuple(labels))

    # Helpers.

    def _with(self, weight: jax.Array, labels: tuple[int, ...]) -> LazyWeight:
        return dataclasses.replace(self, weight=weight, labels=labels)

    def _map_factors(self, label: int, fn) -> LazyWeight:
        a, b = self.a, self.b
        if label in self.a_labels:
            a = fn(a, self.a_labels.index(label))
        if label in self.b_labels:
            b = fn(b, self.b_labels.index(label))
        return dataclasses.replace(self, a=a, b=b)

    def _drop_label(self, label: int) -> LazyWeight:
        out = self._map_factors(label, lambda f, k: lax.squeeze(f, (k,)))
        return dataclasses.replace(
            out,
            a_labels=tuple(lab for lab in self.a_labels if lab != label),
            b_labels=tuple(lab for lab in self.b_labels if lab != label),
        )

    def _regroup(self, olds: list[int], news: list[int], sizes: list[int]) -> LazyWeight:
        """Replaces the factor axes ``olds`` (all of one factor; none: unit axes to add to A)
        by axes ``news`` of ``sizes``."""
        in_b = bool(olds) and olds[0] in self.b_labels and olds[0] not in self.a_labels
        factor, flabels = (self.b, self.b_labels) if in_b else (self.a, self.a_labels)
        rest = [lab for lab in flabels if lab not in olds]
        moved = factor.transpose([flabels.index(lab) for lab in olds + rest])
        rest_shape = moved.shape[len(olds) :]
        factor = moved.reshape(tuple(sizes) + tuple(rest_shape))
        labels = tuple(news + rest)
        if in_b:
            return dataclasses.replace(self, b=factor, b_labels=labels)
        return dataclasses.replace(self, a=factor, a_labels=labels)


def _slice_axis(factor: jax.Array, axis: int, *, start: Any, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(factor, start, size, axis)


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]):
    """Pairs of (old axes, new axes) with equal sizes, in order, covering both shapes (unit axes
    form groups of their own with an empty other side); None when no such pairing exists."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        if i == len(old) or j == len(new):
            return None
        oi, nj, po, pn = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(old):
                po, oi = po * old[i], oi + [i]
                i += 1
            elif pn < po and j < len(new):
                pn, nj = pn * new[j], nj + [j]
                j += 1
            else:
                return None
        groups.append((tuple(oi), tuple(nj)))
    return groups


def einsum(*operands: tuple[jax.Array, tuple[int, ...]], out: tuple[int, ...], precision: Any,
           dtype: Any = None) -> jax.Array:  # fmt: skip
    """``jnp.einsum`` of labelled operands into the labels ``out``."""
    letters: dict[int, str] = {}
    for label in itertools.chain(*(labels for _, labels in operands), out):
        letters.setdefault(label, LETTERS[len(letters)])
    spec = ",".join("".join(letters[lab] for lab in labels) for _, labels in operands)
    spec += "->" + "".join(letters[lab] for lab in out)
    arrays = [x if dtype is None else x.astype(dtype) for x, _ in operands]
    return jnp.einsum(spec, *arrays, precision=precision)


def from_adapted(weight: jax.Array, a: jax.Array, b: jax.Array, layout: str, scale: float,
                 where: str) -> LazyWeight:  # fmt: skip
    """The lazy form of a stored weight whose factors are in canonical order for ``layout``
    (``""``: canonical already)."""
    layout = layout or "i" * (a.ndim - 1) + "o" * (b.ndim - 1)
    labels = tuple(fresh() for _ in range(weight.ndim))
    order = [labels[k] for k in axes_order.canonical_perm(layout)]
    n_stack, n_out = layout.count("s"), layout.count("o")
    a_labels = tuple(order[: len(order) - n_out]) + (RANK,)
    b_labels = tuple(order[:n_stack]) + (RANK,) + tuple(order[len(order) - n_out :])
    return LazyWeight(weight, a, b, labels, a_labels, b_labels, scale, weight.dtype, where)
