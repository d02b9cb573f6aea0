"""The LoRA paper's section 7 analyses as functions: subspace similarity and amplification.

Conventions: jaxlora's ``a`` has shape ``(in, r)``, the transpose of the paper's A (``r × in``), so
the paper's "right-singular vectors of A" are the left-singular vectors of ``a`` here. Updates ΔW
have Flax's ``(in, out)`` layout. Stacked or N-D factors are flattened to 2-D first
(input axes × rank, rank × output axes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

from jaxlora._src import validate


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    validate.array_like(name, x, ndim=2, nonempty=True, finite=True)
    return np.asarray(x, dtype=np.float64)


def input_subspace(a: ArrayLike) -> np.ndarray:
    """Orthonormal basis (columns, by decreasing singular value) of the input space ``a`` reads.

    Args:
        a: a LoRA factor of shape ``(in, r)``.

    Returns:
        ``U`` of shape ``(in, r)``.
    """
    return _subspace(a, "a")


def _subspace(a: ArrayLike, name: str) -> np.ndarray:
    u, _, _ = np.linalg.svd(_matrix(a, name), full_matrices=False)
    return u


def subspace_similarity(a1: ArrayLike, a2: ArrayLike, i: int, j: int) -> float:
    """The paper's normalised subspace similarity φ(A1, A2, i, j) in [0, 1].

    φ = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j), with U the singular vectors of each factor: 1 when
    one top subspace contains the other, 0 when they are orthogonal.

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).normal(size=(32, 4))
        >>> round(subspace_similarity(a, 2 * a, 4, 4), 6)
        1.0
    """
    u1, u2 = _subspace(a1, "a1"), _subspace(a2, "a2")
    validate.integer("i", i)
    validate.integer("j", j)
    for name, k, u in (("i", i, u1), ("j", j, u2)):
        if not 1 <= k <= u.shape[1]:
            raise ValueError(f"`{name}`={k} must be between 1 and the factor's rank {u.shape[1]}")
    overlap = u1[:, :i].T @ u2[:, :j]
    return float(np.sum(overlap**2) / min(i, j))


def similarity_grid(a1: ArrayLike, a2: ArrayLike) -> np.ndarray:
    """φ(A1, A2, i, j) for every i ≤ rank(A1) and j ≤ rank(A2): the paper's Figure 3 heat map."""
    u1, u2 = _subspace(a1, "a1"), _subspace(a2, "a2")
    squared = (u1.T @ u2) ** 2
    cumulative = np.cumsum(np.cumsum(squared, axis=0), axis=1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


@dataclasses.dataclass(frozen=True)
class Amplification:
    """Norms of W projected onto a rank-r subspace (the paper's Table 7).

    Attributes:
        delta_norm: ||ΔW||_F.
        w_on_delta: ||Uᵀ W V||_F with U, V the top-r singular vectors of ΔW.
        w_on_w: the same with W's own top-r singular vectors.
        w_on_random: the same with a random rank-r subspace.
        factor: ``delta_norm / w_on_delta``, how much ΔW amplifies directions W already has.
    """

    delta_norm: float
    w_on_delta: float
    w_on_w: float
    w_on_random: float

    @property
    def factor(self) -> float:
        return self.delta_norm / self.w_on_delta


def _project(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    return float(np.linalg.norm(u.T @ w @ v))


def amplification(w: ArrayLike, delta: ArrayLike, r: int, seed: int = 0) -> Amplification:
    """How strongly ΔW amplifies features of W (paper, section 7.3).

    Args:
        w: the pretrained weight, shape ``(in, out)``.
        delta: the learned update ΔW = s·A·B, same shape.
        r: the subspace rank to project on.
        seed: seed of the random subspace used as a baseline.

    Example:
        >>> import numpy as np
        >>> w = np.diag([10.0, 1.0, 1.0])
        >>> amp = amplification(w, np.diag([0.0, 2.0, 0.0]), r=1)
        >>> amp.w_on_w, amp.w_on_delta, amp.factor
        (10.0, 1.0, 2.0)
    """
    w, delta = _matrix(w, "w"), _matrix(delta, "delta")
    if w.shape != delta.shape:
        raise ValueError(f"`w` {w.shape} and `delta` {delta.shape} must have the same shape")
    validate.integer("r", r)
    validate.integer("seed", seed, minimum=0)
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"`r`={r} must be between 1 and {min(w.shape)}")
    u_d, _, vt_d = np.linalg.svd(delta, full_matrices=False)
    u_w, _, vt_w = np.linalg.svd(w, full_matrices=False)
    rng = np.random.default_rng(seed)
    u_r, _ = np.linalg.qr(rng.normal(size=(w.shape[0], r)))
    v_r, _ = np.linalg.qr(rng.normal(size=(w.shape[1], r)))
    return Amplification(
        delta_norm=float(np.linalg.norm(delta)),
        w_on_delta=_project(w, u_d[:, :r], vt_d[:r].T),
        w_on_w=_project(w, u_w[:, :r], vt_w[:r].T),
        w_on_random=_project(w, u_r, v_r),
    )
