# %% [markdown]
# # Counting and planning GPT-3 175B on a laptop
#
# `jaxlora.split` is a pure function, so `jax.eval_shape` runs it on a tree of
# `jax.ShapeDtypeStruct` leaves: no weight is allocated, yet every adapter shape, every count and
# every byte figure is exact. This notebook plans LoRA for GPT-3 175B (96 layers, d_model 12288)
# and reproduces the paper's memory and checkpoint arithmetic.

# %%
import os

import jax
import matplotlib.pyplot as plt

import jaxlora
from jaxlora.models.shapes import PAPER_MODELS, abstract_params

SMALL = bool(os.environ.get("JAXLORA_SMALL"))  # fewer points in the last plot (the test suite)
gpt3 = abstract_params(PAPER_MODELS["gpt3"])  # float16 ShapeDtypeStructs, a few kB of Python
print(jaxlora.count(gpt3))

# %% [markdown]
# ## LoRA on W_q and W_v, as in the paper's Table 4


# %%
def plan(rank, targets=("query", "value")):
    config = jaxlora.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    return jax.eval_shape(lambda p: jaxlora.split(p, config, jax.random.key(0)), gpt3)


frozen, lora = plan(1)
print(jaxlora.count(frozen, lora))
frozen, lora = plan(8)
counts = jaxlora.count(frozen, lora)
print(counts)
print(counts.table().splitlines()[0])
print("\n".join(counts.table().splitlines()[1:4]), "\n...")

# %% [markdown]
# ## The paper's memory arithmetic
#
# Checkpoint: the base in fp16 is 350 GB; a LoRA r=4 adapter on W_q, W_v is about 35 MB. Training
# with Adam keeps two fp32 moments per *trainable* parameter, so LoRA drops that from 1.4 TB to
# a few hundred MB.


# %%
def nbytes(tree, bytes_per=None):
    return sum(x.size * (bytes_per or x.dtype.itemsize) for x in jax.tree.leaves(tree))


_, lora4 = plan(4)
print(f"base checkpoint (fp16):     {nbytes(gpt3) / 1e9:8.1f} GB")
print(f"LoRA r=4 q,v adapter (fp16): {nbytes(lora4, 2) / 1e6:8.1f} MB")
print(f"Adam moments, full FT:      {2 * nbytes(gpt3, 4) / 1e12:8.2f} TB")
print(f"Adam moments, LoRA r=4:     {2 * nbytes(lora4, 4) / 1e6:8.1f} MB")

# %% [markdown]
# ## Trainable parameters against rank and targets

# %%
ranks = [1, 64] if SMALL else [1, 2, 4, 8, 16, 64]
target_sets = {
    "W_q, W_v": ("query", "value"),
    "W_q, W_k, W_v, W_o": ("query", "key", "value", "out"),
    "all-linear": "all-linear",
}
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, targets in target_sets.items():
    counts = []
    for rank in ranks:
        config = jaxlora.LoraConfig(r=rank, target_modules=targets)
        shapes = jax.eval_shape(
            lambda p, config=config: jaxlora.split(p, config, jax.random.key(0)), gpt3
        )
        counts.append(jaxlora.count(*shapes).trainable)
    ax.plot(ranks, counts, marker="o", label=label)
ax.set(
    xscale="log",
    yscale="log",
    xlabel="rank r",
    ylabel="trainable parameters",
    title="GPT-3 175B: LoRA's trainable parameters",
)
ax.legend()
plt.show()
