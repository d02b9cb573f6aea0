"""The factored path on models not written with jaxlora in mind (tests/unseen_models.py).

jaxlora's promise: for every adapted kernel, ``jaxlora.apply(..., mode="factored")`` uses the
adapter exactly as :func:`jaxlora.merge` would (``mode="merged"``), or raises a clear error naming
the module; an adapted kernel is never silently unused. For each model x framework, with every
kernel adapted and a non-trivial adapter (``init_lora_weights=False``: B != 0):

1. factored and merged outputs agree (float32, 1e-5 of the output's scale), and differ from the
   base model's: the adapter is not dropped;
2. the gradients w.r.t. the adapter agree in both modes, and every adapter leaf gets a non-zero
   gradient;
3. a few jitted Adam steps in factored mode move every adapter leaf and leave the base bit for bit
   as it was.

Every case is supported: a layer the low-rank term does not know runs on its merged weight.
"""

from __future__ import annotations

import functools

import jax
import pytest
from flax import nnx

import jaxlora
from tests import unseen_models
from tests.model_contract import (
    assert_factored_gradient_matches_merged,
    assert_factored_output_matches_merged,
    assert_training_moves_only_the_adapter,
    compiled,
    probe_loss,
    run_merged,
    train_factored,
)
from tests.unseen_models import BY_ID

# The fast core (`-m "not slow"`) runs one case (a subclass of a known layer, in linen); every
# case, NNX's and the raw params and the scaled and hand-tied embeddings among them, runs in the
# full suite.
FAST_CASES = {"dense_subclass-linen"}
SUPPORTED = [
    pytest.param(case.id, marks=[] if case.id in FAST_CASES else [pytest.mark.slow])
    for case in unseen_models.CASES
]
OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
STEPS = 3


@functools.cache
def _setup(case_id):
    """``(built, config, frozen, lora)`` for a case: every kernel adapted, B != 0."""
    case = BY_ID[case_id]
    built = case.build()
    config = jaxlora.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=case.target_modules,
        layouts=dict(case.layouts),
        init_lora_weights=False,
    )
    # split op by op: its few small ops recur across the zoo (r=2, widths of 16 and 32), so after
    # the first cases they are compiled already; one compiled split per case cost about 6 times
    # as much CPU in all. ``frozen`` is ``params`` itself.
    _, lora = jaxlora.split(built.params, config, jax.random.key(1))
    return built, config, built.params, lora


def _run(built, frozen, config, mode):
    """``lora -> model output`` in ``mode``."""

    def run(lora):
        extra = {} if built.variables is None else {"variables": built.variables}
        return jaxlora.apply(built.model, frozen, lora, config, *built.args, mode=mode,
                             rngs=built.rngs, **extra, **built.kwargs)  # fmt: skip

    return run


def _base_output(built):
    """The model without any adapter, run the plain Flax way (jitted)."""
    if isinstance(built.model, nnx.GraphDef):

        def base(params):
            return nnx.merge(built.model, params)(*built.args, **built.kwargs)

    else:

        def base(params):
            variables = {**(built.variables or {}), "params": params}
            return built.model.apply(variables, *built.args, rngs=built.rngs, **built.kwargs)

    return compiled(base, built.params)(built.params)


@functools.cache
def _factored(case_id):
    """The factored path, jitted: the output and adapter gradient at the initial adapter, and the
    adapter and base after :data:`STEPS` Adam steps (one compiled step computes all of it)."""
    built, config, frozen, lora = _setup(case_id)
    loss = probe_loss(_run(built, frozen, config, "factored"))
    return train_factored(loss, lora, frozen, STEPS)


@functools.cache
def _merged(case_id):
    """The merged path, jitted: the output and adapter gradient at the initial adapter (a dict)."""
    built, config, frozen, lora = _setup(case_id)
    loss = probe_loss(_run(built, frozen, config, "merged"))
    return run_merged(loss, lora)


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_output_equals_merged(case_id):
    built, _, _, _ = _setup(case_id)
    assert_factored_output_matches_merged(
        _factored(case_id), _merged(case_id), _base_output(built), OUTPUT_RTOL
    )


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_gradient_equals_merged(case_id):
    _, _, _, lora = _setup(case_id)
    assert_factored_gradient_matches_merged(lora, _factored(case_id), _merged(case_id), GRAD_RTOL)


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_factored_training_moves_only_the_adapter(case_id):
    _, _, _, lora = _setup(case_id)
    assert_training_moves_only_the_adapter(lora, _factored(case_id), loss_goes_down=True)


def test_every_case_has_a_linen_and_an_nnx_peer():
    """The zoo stays paired: each model in both frameworks (ConvLocal exists in linen only)."""
    names = {case.name for case in unseen_models.CASES}
    for name in names:
        frameworks = {c.framework for c in unseen_models.CASES if c.name == name}
        assert frameworks == ({"linen"} if name == "conv_local" else {"linen", "nnx"}), name
