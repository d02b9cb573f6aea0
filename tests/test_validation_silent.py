"""Inputs that used to be accepted in silence or refused with the wrong reason (issue 24): each
is now a clear error naming the argument, or a documented behaviour that a test pins down."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlora

FROZEN = {"up": {"kernel": jnp.ones((4, 6))}, "down": {"kernel": jnp.ones((6, 4))}}
CONFIG = jaxlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)


# --- bfloat16 adapters (np.issubdtype calls ml_dtypes' bfloat16 not floating) ----------------


def test_bfloat16_peft_round_trip_is_exact(tmp_path):
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), FROZEN)
    config = jaxlora.LoraConfig(
        r=2, target_modules=["up", "down"], init_lora_weights=False, dtype="bfloat16"
    )
    lora = jaxlora.split(frozen, config, jax.random.key(0))[1]
    jaxlora.save_peft(tmp_path / "bf16", lora, config, frozen)
    back, _ = jaxlora.load_peft(tmp_path / "bf16", frozen, dtype="bfloat16")
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        assert got.dtype == jnp.bfloat16
        assert bool((got == want).all())
