import jax
import jax.numpy as jnp
import optax

import jaxlora
from jaxlora import LoraConfig

TREE = {
    "enc": {
        "q": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4), "lora_a": jnp.ones((4, 2)),
              "lora_b": jnp.ones((2, 4)), "lora_magnitude": jnp.ones(4)},
        "k": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    },
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
}  # fmt: skip


def flags(config):
    mask = jaxlora.trainable_mask(TREE, config)
    return {f"{m}/{leaf}": v for m, leaves in mask["enc"].items() for leaf, v in leaves.items()} | {
        f"head/{leaf}": v for leaf, v in mask["head"].items()
    }


def test_mask_follows_bias_mode_and_modules_to_save():
    none = flags(LoraConfig(bias="none"))
    assert [k for k, v in none.items() if v] == ["q/lora_a", "q/lora_b", "q/lora_magnitude"]
    lora_only = flags(LoraConfig(bias="lora_only"))
    assert lora_only["q/bias"] and not lora_only["k/bias"] and not lora_only["head/bias"]
    everything = flags(LoraConfig(bias="all", modules_to_save=["head"]))
    assert everything["k/bias"] and everything["head/kernel"] and not everything["q/kernel"]


def test_labels_and_partition():
    labels = jaxlora.trainable_labels(TREE, LoraConfig())
    assert labels["enc"]["q"]["lora_a"] == "trainable" and labels["enc"]["q"]["kernel"] == "frozen"
    frozen, lora = jaxlora.partition(TREE, LoraConfig(modules_to_save=["head"]))
    assert set(lora["enc"]["q"]) == {"lora_a", "lora_b", "lora_magnitude"}
    assert set(lora["head"]) == {"kernel", "bias"}
    assert set(frozen["enc"]["q"]) == {"kernel", "bias"}


def test_freeze_keeps_state_for_theta_only():
    optimizer = jaxlora.freeze(optax.sgd(0.1, momentum=0.9), LoraConfig())
    state = optimizer.init(TREE)
    traces = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(x.size for x in traces) == 8 + 8 + 4
    grads = jax.tree.map(jnp.ones_like, TREE)
    updates, _ = optimizer.update(grads, state, TREE)
    assert not updates["enc"]["q"]["kernel"].any() and updates["enc"]["q"]["lora_a"].all()
