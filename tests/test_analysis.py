import numpy as np
import pytest

from jaxlora import analysis


def test_similarity_is_one_for_nested_subspaces_and_zero_for_orthogonal():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(40, 12)))
    small = basis[:, :4] * np.array([4.0, 3.0, 2.0, 1.0])
    large = basis[:, :8] * np.arange(8, 0, -1)
    assert analysis.subspace_similarity(small, large, 4, 8) == pytest.approx(1.0)
    assert analysis.subspace_similarity(small, basis[:, 8:12], 4, 4) == pytest.approx(
        0.0, abs=1e-12
    )


def test_grid_matches_pointwise_definition():
    rng = np.random.default_rng(1)
    a8, a64 = rng.normal(size=(50, 8)), rng.normal(size=(50, 16))
    grid = analysis.similarity_grid(a8, a64)
    assert grid.shape == (8, 16)
    for i, j in [(1, 1), (3, 7), (8, 16)]:
        assert grid[i - 1, j - 1] == pytest.approx(analysis.subspace_similarity(a8, a64, i, j))
    assert (grid >= -1e-12).all() and (grid <= 1 + 1e-12).all()


def test_random_subspaces_have_similarity_near_chance():
    rng = np.random.default_rng(2)
    value = analysis.subspace_similarity(
        rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4)), 4, 4
    )
    assert value < 0.05  # chance level is j / dim = 0.004


def test_amplification_orders_the_projections():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 48))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    # An update along W's weaker directions, amplified: the paper's finding.
    delta = 5.0 * u[:, 10:14] @ np.diag(s[10:14]) @ vt[10:14]
    amp = analysis.amplification(w, delta, r=4)
    assert amp.w_on_w > amp.w_on_delta > amp.w_on_random * 0.5
    assert amp.factor == pytest.approx(5.0 * np.linalg.norm(s[10:14]) / np.linalg.norm(s[10:14]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: analysis.subspace_similarity(np.ones(3), np.ones((3, 1)), 1, 1),
            r"`a1` must have 2 axes, got shape \(3,\)",
        ),
        (
            lambda: analysis.subspace_similarity(np.eye(3), np.eye(3), 4, 1),
            "`i`=4 must be between 1",
        ),
        (
            lambda: analysis.subspace_similarity(np.eye(3), np.eye(3), 1, 0),
            "`j`=0 must be between 1",
        ),
        (
            lambda: analysis.amplification(np.eye(3), np.eye(2), 1),
            r"`w` \(3, 3\) and `delta` \(2, 2\)",
        ),
        (lambda: analysis.amplification(np.eye(3), np.eye(3), 0), "`r`=0 must be between 1 and 3"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
