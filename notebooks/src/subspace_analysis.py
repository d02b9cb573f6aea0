# %% [markdown]
# # Rank and subspace analysis (the LoRA paper, section 7)
#
# We fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes twice, with LoRA r=8 and r=64 on W_q and W_v,
# then ask the paper's questions with `jaxlora.analysis`:
#
# 1. How much do the top directions of A learned at r=8 overlap those learned at r=64?
#    (normalised subspace similarity φ, Figure 3 of the paper)
# 2. Does ΔW amplify directions that W already has, or new ones? (amplification factor, Table 7)
#
# Set `JAXLORA_SMALL=1` for a quick run (the test suite does); the committed outputs come from the
# full settings below.

# %%
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path.cwd().parent))

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxlora
from experiments.examples import sentiment
from jaxlora import analysis

SMALL = bool(os.environ.get("JAXLORA_SMALL"))
STEPS, BATCH, LENGTH = (4, 8, 16) if SMALL else (300, 32, 48)
task = sentiment.load_task(LENGTH, n_test=32 if SMALL else 1024)
model, params = sentiment.load_model()


# %%
def fine_tune(rank):
    config = sentiment.lora_config(rank, alpha=2 * rank)
    frozen, lora = jaxlora.split(params, config, jax.random.key(rank))

    forward, loss = sentiment.lora_functions(model, config)
    lora, losses, _ = sentiment.train(
        loss, lora, frozen, task, steps=STEPS, batch_size=BATCH, learning_rate=2e-3
    )
    acc = sentiment.accuracy(sentiment.predict(forward, (lora, frozen), task), task.test_labels)
    print(
        f"r={rank:>2}: train loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}, "
        f"test accuracy {acc:.4f}"
    )
    return config, lora


config8, lora8 = fine_tune(8)
config64, lora64 = fine_tune(64)

# %% [markdown]
# ## Subspace similarity between A (r=8) and A (r=64)
#
# φ(i, j) = ||U_8[:, :i]ᵀ U_64[:, :j]||²_F / min(i, j). Values near 1 in the first column mean the
# top direction learned at r=8 is also found at r=64: the paper's evidence that a very low rank
# already captures the update.


# %%
def factor(lora, layer, name):
    return np.asarray(lora["bert"]["encoder"][f"layer_{layer}"]["attention"][name]["lora_a"])


layer = 3
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, name in zip(axes, ("query", "value"), strict=True):
    grid = analysis.similarity_grid(factor(lora8, layer, name), factor(lora64, layer, name))
    image = ax.imshow(grid[:, :8], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(title=f"layer {layer} W_{name[0]}: φ(A_r=8, A_r=64, i, j)", xlabel="j", ylabel="i")
    dims = factor(lora8, layer, name).shape[0]
    print(
        f"W_{name[0]}: φ(1, 1) = {grid[0, 0]:.3f}, φ(8, 8) = {grid[7, 7]:.3f} "
        f"(two random 8-dim subspaces of a {dims}-dim space: about {8 / dims:.3f})"
    )
fig.colorbar(image, ax=axes)
plt.show()

# %% [markdown]
# ## Amplification: ΔW versus W projected on ΔW's subspace

# %%
rows = []
for rank, config, lora in ((8, config8, lora8), (64, config64, lora64)):
    merged = jaxlora.merge(params, lora, config)
    w = np.asarray(params["bert"]["encoder"][f"layer_{layer}"]["attention"]["query"]["kernel"])
    attention = merged["bert"]["encoder"][f"layer_{layer}"]["attention"]
    delta = np.asarray(attention["query"]["kernel"]) - w
    amp = analysis.amplification(w, delta, r=min(rank, 8))
    rows.append((rank, amp))
    print(
        f"r={rank:>2}: ||ΔW||_F = {amp.delta_norm:.4f}, ||UᵀWV||_F on ΔW's top-8 = "
        f"{amp.w_on_delta:.4f}, on W's top-8 = {amp.w_on_w:.4f}, random = {amp.w_on_random:.4f}, "
        f"amplification = {amp.factor:.2f}"
    )
