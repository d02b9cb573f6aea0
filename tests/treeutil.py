"""Trees for tests: comparison (structure first, then values with explicit tolerances) and a
seeded perturbation."""

import jax
import numpy as np


def assert_trees_close(actual, expected, rtol=0.0, atol=0.0):
    """Same structure, shapes and dtypes; values within ``rtol``/``atol`` (exact by default)."""
    actual_def = jax.tree.structure(actual)
    expected_def = jax.tree.structure(expected)
    if actual_def != expected_def:
        raise AssertionError(f"tree structures differ:\n{actual_def}\n{expected_def}")
    pairs = zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    )
    for (path, a), b in pairs:
        where = jax.tree_util.keystr(path)
        assert np.shape(a) == np.shape(b), f"{where}: shape {np.shape(a)} != {np.shape(b)}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=where,
        )


def assert_trees_bitwise_equal(actual, expected):
    """Same structure and identical bytes in every leaf."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), f"{jax.tree_util.keystr(path)} differs bitwise"


def perturbed(tree, seed, scale=0.1):
    """``tree`` with every leaf moved by ``scale``·N(0, 1) noise, so that every leaf matters."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, moved)
