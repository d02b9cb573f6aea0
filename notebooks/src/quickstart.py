# %% [markdown]
# # jaxlora quickstart
#
# LoRA as pure functions over a Flax params tree: `split` the pretrained params into the frozen base
# and a fresh adapter Θ, train Θ alone with optax, `merge` for deployment. This notebook uses a
# small linen Transformer block with `MultiHeadDotProductAttention`, whose query/key/value kernels
# are 3-D (embed, heads, head_dim).

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import jaxlora

STEPS = 30 if os.environ.get("JAXLORA_SMALL") else 300


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(x)
        h = nn.gelu(nn.Dense(128, name="fc1")(nn.LayerNorm()(x)))
        return x + nn.Dense(32, name="fc2")(h)


model = Block()
x = jax.random.normal(jax.random.key(0), (16, 10, 32))
target = jnp.roll(x, 1, axis=1)  # a toy task: shift the sequence by one position
params = model.init(jax.random.key(1), x)["params"]

# %% [markdown]
# ## Which kernels, and how their axes split
#
# 2-D kernels need nothing. The attention kernels are N-D, so their layout (which axes are inputs,
# which outputs) is read off the model by an abstract trace; nothing is allocated.

# %%
layouts = jaxlora.infer_layouts(model, x)
print(layouts)
config = jaxlora.LoraConfig(
    r=8, lora_alpha=16, target_modules=["query", "value", "fc1"], layouts=layouts
)
frozen, lora = jaxlora.split(params, config, jax.random.key(2))
print(jax.tree.map(jnp.shape, lora))
print(jaxlora.count(frozen, lora).table())

# %% [markdown]
# ## A fresh adapter changes nothing, bit for bit

# %%
merged = jaxlora.merge(frozen, lora, config)
print(
    all(
        bool((a == b).all())
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True)
    )
)

# %% [markdown]
# ## Train Θ only


# %%
def loss(lora, frozen, x, y):
    out = model.apply({"params": jaxlora.merge(frozen, lora, config)}, x)
    return jnp.mean((out - y) ** 2)


optimizer = optax.adamw(3e-3)
opt_state = optimizer.init(lora)


@jax.jit
def step(lora, opt_state):
    value, grads = jax.value_and_grad(loss)(lora, frozen, x, target)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, value


history = []
for _ in range(STEPS):
    lora, opt_state, value = step(lora, opt_state)
    history.append(float(value))
print(f"loss {history[0]:.4f} -> {history[-1]:.4f}")
print(
    "optimizer state scalars:",
    sum(v.size for v in jax.tree.leaves(opt_state)) - 1,
    "= 2 x |Θ| =",
    2 * jaxlora.count(frozen, lora).trainable,
)
plt.figure(figsize=(5, 3))
plt.plot(history)
plt.xlabel("step")
plt.ylabel("loss")
plt.title("LoRA training, base frozen")
plt.show()

# %% [markdown]
# ## Deploy: merge, or undo the merge

# %%
deployed = jaxlora.merge(frozen, lora, config)
restored = jaxlora.unmerge(deployed, lora, config)
pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True)
print("max |unmerge(merge(W)) - W|:", max(float(jnp.abs(a - b).max()) for a, b in pairs))
print(jaxlora.LoraConfig.from_json(config.to_json()) == config)
