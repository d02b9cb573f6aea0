"""Strict numerics for every test: no silent dtype or rank promotion.

optax's Adam mixes Python floats with int32 step counts, which strict dtype promotion rejects; a
test that steps such an optimizer says so with ``@pytest.mark.standard_dtypes``.
"""

import jax
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standard_dtypes: run with standard (not strict) jax dtype promotion"
    )


@pytest.fixture(autouse=True)
def _strict_numerics(request):
    mode = "standard" if request.node.get_closest_marker("standard_dtypes") else "strict"
    with jax.numpy_dtype_promotion(mode), jax.numpy_rank_promotion("raise"):
        yield
