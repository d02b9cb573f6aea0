"""Strict numerics for every test: no silent dtype or rank promotion; and a fast core.

optax's Adam mixes Python floats with int32 step counts, which strict dtype promotion rejects; a
test that steps such an optimizer says so with ``@pytest.mark.standard_dtypes``.

Tests marked ``slow`` (registered in pyproject.toml) need notebooks, PyTorch, subprocesses or
pretrained weights; ``python -m pytest -m "not slow"`` runs the fast core. Under exactly that
selection a module marked slow as a whole (``pytestmark = pytest.mark.slow``) is not even imported,
so the core does not pay for importing torch or the weight readers.
"""

import re

import jax
import pytest

FAST_CORE = "not slow"
SLOW_MODULE = re.compile(r"^pytestmark = pytest\.mark\.slow\b", re.MULTILINE)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standard_dtypes: run with standard (not strict) jax dtype promotion"
    )


def pytest_collection_modifyitems(config, items):
    # The reference models' doctests build and compile whole models: full suite only.
    for item in items:
        if isinstance(item, pytest.DoctestItem) and "models" in item.path.parts:
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    if config.getoption("markexpr", "").strip() != FAST_CORE or collection_path.suffix != ".py":
        return None
    return True if SLOW_MODULE.search(collection_path.read_text()) else None


@pytest.fixture(autouse=True)
def _strict_numerics(request):
    mode = "standard" if request.node.get_closest_marker("standard_dtypes") else "strict"
    with jax.numpy_dtype_promotion(mode), jax.numpy_rank_promotion("raise"):
        yield
