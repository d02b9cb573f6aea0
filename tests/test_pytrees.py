"""Any pytree as params: dicts keyed by ints, lists, tuples, NamedTuples and dataclasses.

Θ keeps the nested-dict form keyed by the tree's own raw keys (ints stay ints); ``merge`` gives
back the tree's own type. A ``weight`` leaf reads PyTorch's ``(out, in)``, a ``kernel`` Flax's
``(in, out)``.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora._src.tree.pairing import adapter_for
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

KEY = jax.random.key(0)


class Attn(NamedTuple):
    q_proj: dict
    v_proj: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
    attn: Attn
    mlp: dict


def _linear(seed, n_in, n_out, torch_style=True):
    w = jax.random.normal(jax.random.key(seed), (n_out, n_in) if torch_style else (n_in, n_out))
    return {"weight" if torch_style else "kernel": w, "bias": jnp.zeros(n_out)}


def _block(seed):
    return Block(
        attn=Attn(q_proj=_linear(seed, 4, 4), v_proj=_linear(seed + 1, 4, 4)),
        mlp={"up": _linear(seed + 2, 4, 6)},
    )


TREES = {
    "int-keyed dict": lambda: {"layers": {0: _linear(0, 4, 6, False), 1: _linear(1, 6, 4, False)}},
    "list": lambda: [{"fc": _linear(0, 4, 6)}, {"fc": _linear(1, 6, 4)}],
    "tuple": lambda: ({"fc": _linear(0, 4, 6)}, {"fc": _linear(1, 6, 4)}),
    "dataclass of NamedTuple": lambda: {"layers": [_block(0), _block(10)]},
}
TARGETS = {
    "int-keyed dict": ["0", "1"],
    "list": ["fc"],
    "tuple": ["fc"],
    "dataclass of NamedTuple": ["q_proj", "v_proj", "up"],
}


@pytest.mark.parametrize("name", TREES)
def test_split_merge_unmerge_count_on_any_tree(name):
    params = TREES[name]()
    fresh = jaxlora.LoraConfig(r=2, target_modules=TARGETS[name], bias="lora_only")
    frozen, lora = jaxlora.split(params, fresh, KEY)
    assert frozen is params
    merged = jaxlora.merge(frozen, lora, fresh)
    assert type(merged) is type(params)
    assert_trees_bitwise_equal(merged, params)  # a fresh adapter changes nothing

    config = jaxlora.LoraConfig(r=2, target_modules=TARGETS[name], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, KEY)
    merged = jaxlora.merge(frozen, lora, config)
    assert_trees_close(jaxlora.unmerge(merged, lora, config), params, atol=1e-5)
    targets = jaxlora.find_targets(params, config)
    hand = sum((t.shape[0] + t.shape[1]) * 2 for t in targets)
    assert jaxlora.count(frozen, lora).trainable == hand  # r=2: (in + out)·2 per 2-D weight
    total = sum(x.size for x in jax.tree.leaves(params)) + hand
    assert jaxlora.count(frozen, lora).total == total


def test_weight_reads_out_in_and_kernel_in_out():
    """``weight`` (out, in): ΔW = s·(A·B)ᵀ; ``kernel`` (in, out): ΔW = s·A·B."""
    params = [{"fc": _linear(0, 4, 6)}, {"d": _linear(1, 4, 6, torch_style=False)}]
    config = jaxlora.LoraConfig(r=2, target_modules=["fc", "d"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, KEY)
    merged = jaxlora.merge(frozen, lora, config)
    s = config.scale_for("0/fc", 2)
    fc, d = lora[0]["fc"], lora[1]["d"]
    assert fc["lora_a"].shape == (4, 2) and fc["lora_b"].shape == (2, 6)
    want_fc = params[0]["fc"]["weight"] + s * (fc["lora_a"] @ fc["lora_b"]).T
    want_d = params[1]["d"]["kernel"] + s * (d["lora_a"] @ d["lora_b"])
    np.testing.assert_allclose(merged[0]["fc"]["weight"], want_fc, atol=1e-6)
    np.testing.assert_allclose(merged[1]["d"]["kernel"], want_d, atol=1e-6)


def test_integer_keys_count_and_combine():
    """The bug of issue 25: the adapter was looked up by the string of an int key."""
    params = {
        "layers": {0: {"q": {"kernel": jnp.ones((4, 4))}}, 1: {"q": {"kernel": jnp.ones((4, 4))}}}
    }
    config = jaxlora.LoraConfig(r=2, target_modules=["q"])
    frozen, lora = jaxlora.split(params, config, KEY)
    assert set(lora["layers"]) == {0, 1}
    assert jaxlora.count(frozen, lora).trainable == 2 * (4 * 2 + 2 * 4)
    combined = jaxlora.combine(frozen, lora)
    assert sorted(combined["layers"][1]["q"]) == ["kernel", "lora_a", "lora_b"]
    back_frozen, back_lora = jaxlora.partition(combined, config)
    assert_trees_bitwise_equal(back_lora, lora)
    assert_trees_bitwise_equal(back_frozen, frozen)


def test_adapter_for_pairs_leaves_with_their_adapter():
    params = [{"fc": _linear(0, 4, 6)}]
    config = jaxlora.LoraConfig(r=2, target_modules=["fc"], bias="all")
    _, lora = jaxlora.split(params, config, KEY)
    found = {
        jax.tree_util.keystr(path): adapter_for(lora, path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert found["[0]['fc']['weight']"] is lora[0]["fc"]
    assert found["[0]['fc']['bias']"] is lora[0]["fc"]["bias"]
    assert adapter_for(lora, (0, "fc", "weight")) is lora[0]["fc"]  # raw keys work too
    assert adapter_for(lora, (1, "fc", "weight")) is None


def test_nd_weight_without_layer_needs_a_layout():
    params = {"stack": {"weight": jnp.ones((2, 6, 4))}}
    with pytest.raises(ValueError, match=r"cannot tell the input and output axes.*`stack`"):
        jaxlora.split(params, jaxlora.LoraConfig(target_modules=["stack"]), KEY)
    config = jaxlora.LoraConfig(r=2, target_modules=["stack"], layouts={"stack": "soi"})
    _, lora = jaxlora.split(params, config, KEY)
    assert lora["stack"]["lora_a"].shape == (2, 4, 2)


def test_a_lone_leaf_is_no_params_tree():
    config = jaxlora.LoraConfig(target_modules=["q"])
    with pytest.raises(TypeError, match=r"`params` \(in `split`\) must be the model's params"):
        jaxlora.split(jnp.ones((3, 3)), config, KEY)
    with pytest.raises(TypeError, match=r"`frozen` must be a params pytree"):
        jaxlora.merge(None, {}, config)
