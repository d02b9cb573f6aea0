"""The factored path on public Flax model code we did not write: the ``jax-models`` package.

The same guarantee as tests/test_unseen_models.py, on real third-party linen vision models (tiny
configs, 32x32 images): with every kernel adapted and a non-trivial adapter
(``init_lora_weights=False``: B != 0),

1. ``jaxlora.apply(..., mode="factored")`` gives the output of ``mode="merged"`` (float32, 1e-5 of
   the output's scale), and not the base model's;
2. the gradients w.r.t. the adapter agree in both modes (1e-4 of each leaf's scale), and every
   adapter leaf gets a non-zero gradient;
3. two jitted Adam steps in factored mode move every adapter leaf and leave the base bit for bit.

The models: MLP-Mixer (token- and channel-mixing Dense layers on swapped axes), ConvMixer
(BatchNorm running statistics through ``variables=``, and ``DepthwiseConv2D``: a raw ``kernel``
param fed to ``lax.conv_general_dilated``, which ``infer_layouts`` cannot see, so its layout is
stated here as ``"wwio"``), and CaiT (talking-heads attention: Dense layers over the head axis,
class attention, LayerScale). ConvNeXt and Swin are left out: their ``__call__`` calls ``.item()``
on a ``jnp.linspace``, so they cannot run under ``jax.jit`` / ``eval_shape`` at all (nor
``infer_layouts``), with or without jaxlora.

The package's code uses NumPy-style rank promotion (``gamma * x`` with ``gamma`` of shape
``(dim,)``), which tests/conftest.py makes an error; the model runs with it allowed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

pytest.importorskip("jax_models")

from jax_models.models.cait import CaiT  # noqa: E402
from jax_models.models.conv_mixer import ConvMixer  # noqa: E402
from jax_models.models.mlp_mixer import MLPMixer  # noqa: E402

from tests.model_contract import (  # noqa: E402
    assert_factored_gradient_matches_merged,
    assert_factored_output_matches_merged,
    assert_training_moves_only_the_adapter,
    compiled,
    paths,
    probe_loss,
    run_merged,
    train_factored,
)

# The full suite only (compiles three third-party models).
pytestmark = pytest.mark.slow

OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
STEPS = 2
IMAGE = (2, 32, 32, 3)
KWARGS = {"deterministic": True}  # no dropout / drop-path; BatchNorm on its running statistics


def _mlp_mixer():
    return MLPMixer(
        patch_size=8, num_mixers_layers=2, hidden_size=16, channels_dim=32, tokens_dim=8,
        dropout=0.0, attach_head=True, num_classes=5,
    )  # fmt: skip


def _conv_mixer():
    return ConvMixer(
        features=16, patch_size=4, num_mixer_layers=2, filter_size=3, attach_head=True,
        num_classes=5,
    )  # fmt: skip


def _cait():
    # init_scale=1: LayerScale's default 1e-4 would leave the blocks' adapters a vanishing signal.
    return CaiT(
        patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, depth_token_only=1,
        mlp_ratio_clstk=2, init_scale=1.0, attach_head=True, num_classes=5,
    )  # fmt: skip


MODELS = {"mlp_mixer": _mlp_mixer, "conv_mixer": _conv_mixer, "cait": _cait}
# CaiT takes ~13 s here (compiling init, merged and factored paths): full suite only.
CASES = [pytest.param(name, marks=[pytest.mark.slow] if name == "cait" else []) for name in MODELS]


def _foreign_numerics():
    """The numerics the package's code is written for (NumPy-style rank promotion)."""
    return jax.numpy_rank_promotion("allow")


def _raw_kernel_layouts(params, layouts):
    """``"wwio"`` for each 4-D ``kernel`` param ``infer_layouts`` did not see (the package's
    ``DepthwiseConv2D``: a ``(kh, kw, 1, channels)`` HWIO kernel read by ``lax.conv``)."""
    extra = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        module = "/".join(names[:-1])
        if names[-1] == "kernel" and leaf.ndim == 4 and module not in layouts:
            extra[module] = "wwio"
    return extra


def _trained_looking(params):
    """The params as a trained model's look: those that init to all zeros (the biases, CaiT's
    ``cls_token`` and ``pos_embed``) get small random values. (With CaiT's zero ``cls_token`` the
    class-attention query is 0, and its ``q`` / ``k`` adapters get no gradient in either mode.)"""
    rng = np.random.default_rng(3)

    def fill(leaf):
        if np.any(np.asarray(leaf)):
            return leaf
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype)

    return jax.tree.map(fill, params)


@functools.cache
def _setup(case_id):
    """``(model, x, config, frozen, lora, variables)``: every kernel adapted, B != 0."""
    model = MODELS[case_id]()
    x = jax.random.normal(jax.random.key(0), IMAGE)
    key = jax.random.key(2)
    with _foreign_numerics():
        variables = dict(compiled(lambda k, x: model.init(k, x, **KWARGS), key, x)(key, x))
        variables["params"] = _trained_looking(variables["params"])
        if "batch_stats" in variables:
            # One training-mode pass, so the running statistics are not the trivial (0, 1).
            def update(v, x):
                return model.apply(v, x, deterministic=False, mutable=["batch_stats"])[1]

            variables["batch_stats"] = compiled(update, variables, x)(variables, x)["batch_stats"]
        layouts = jaxlora.infer_layouts(model, x, **KWARGS)
    params = variables.pop("params")
    layouts.update(_raw_kernel_layouts(params, layouts))
    config = jaxlora.LoraConfig(
        r=2, lora_alpha=4, target_modules=".*", init_lora_weights=False, layouts=layouts
    )
    key = jax.random.key(1)
    frozen, lora = compiled(lambda p, k: jaxlora.split(p, config, k), params, key)(params, key)
    return model, x, config, frozen, lora, variables or None


def _run(case_id, mode):
    """``lora -> model output`` in ``mode``."""
    model, x, config, frozen, _, variables = _setup(case_id)
    extra = {} if variables is None else {"variables": variables}

    def run(lora):
        return jaxlora.apply(model, frozen, lora, config, x, mode=mode, **extra, **KWARGS)

    return run


def _probe(out):
    """A scalar linear in the output (fixed random weights)."""
    weights = jax.random.normal(jax.random.key(4), out.shape)
    return jnp.sum(out * weights)


@functools.cache
def _base_output(case_id):
    model, x, _, frozen, _, variables = _setup(case_id)

    def base(params):
        return model.apply({**(variables or {}), "params": params}, x, **KWARGS)

    with _foreign_numerics():
        out = compiled(base, frozen)(frozen)
    return np.asarray(out)


@functools.cache
def _factored(case_id):
    """The factored path, jitted: output and adapter gradient at the initial adapter, and the
    adapter and base after :data:`STEPS` Adam steps."""
    _, _, _, frozen, lora, _ = _setup(case_id)
    loss = probe_loss(_run(case_id, "factored"), _probe)
    return train_factored(loss, lora, frozen, STEPS, numerics=_foreign_numerics)


@functools.cache
def _merged(case_id):
    """The merged path, jitted: output and adapter gradient at the initial adapter."""
    _, _, _, _, lora, _ = _setup(case_id)
    loss = probe_loss(_run(case_id, "merged"), _probe)
    return run_merged(loss, lora, numerics=_foreign_numerics)


@pytest.mark.parametrize("case_id", CASES)
def test_every_kernel_is_adapted(case_id):
    """``target_modules=".*"`` reaches every kernel, the raw depthwise ones included."""
    _, _, _, frozen, lora, _ = _setup(case_id)
    kernels = {p.rsplit("]", 2)[0] + "]" for p in paths(frozen) if p.endswith("['kernel']")}
    adapted = {p.rsplit("]", 2)[0] + "]" for p in paths(lora) if p.endswith("['lora_a']")}
    assert kernels and kernels == adapted, sorted(kernels ^ adapted)
    if case_id == "conv_mixer":
        assert any("DepthwiseConv2D" in p for p in adapted), sorted(adapted)


@pytest.mark.parametrize("case_id", CASES)
def test_factored_output_equals_merged(case_id):
    assert_factored_output_matches_merged(
        _factored(case_id), _merged(case_id), _base_output(case_id), OUTPUT_RTOL
    )


@pytest.mark.parametrize("case_id", CASES)
def test_factored_gradient_equals_merged(case_id):
    *_, lora, _ = _setup(case_id)
    assert_factored_gradient_matches_merged(lora, _factored(case_id), _merged(case_id), GRAD_RTOL)


@pytest.mark.parametrize("case_id", CASES)
def test_factored_training_moves_only_the_adapter(case_id):
    *_, lora, _ = _setup(case_id)
    assert_training_moves_only_the_adapter(lora, _factored(case_id))
