"""Rotten Tomatoes sentiment with all-MiniLM-L6-v2: the data, the model and one training loop.

Shared by ``finetune.py`` (the main job) and ``quality.py`` (LoRA ranks against full fine-tuning)
in ``experiments/examples/``, and by the QLoRA accuracy check of
``experiments/benchmarks/bench_memory.py``. Every variant trains a pytree ``trainable`` with AdamW
through a loss ``loss(trainable, frozen, ids, mask, labels)``, so LoRA, head-only and full
fine-tuning share one loop. The frozen weights are jit *arguments*, never closed over: a
closed-over array becomes an XLA constant, which bloats and slows compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora import apply
from jaxlora.models import bert, data
from jaxlora.models.bert import weights as bert_weights


@dataclasses.dataclass(frozen=True)
class Task:
    """Tokenised train and test splits."""

    train_ids: np.ndarray
    train_mask: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_mask: np.ndarray
    test_labels: np.ndarray


def load_task(max_length: int = 64, n_test: int | None = None, seed: int = 0) -> Task:
    """12,752 review snippets, 80/20 train/test, tokenised to ``max_length`` tokens."""
    texts, labels = data.rotten_tomatoes()
    train_idx, test_idx = data.train_test_split(len(texts), test_fraction=0.2, seed=seed)
    if n_test is not None:
        test_idx = test_idx[:n_test]
    tokenizer = bert_weights.load_minilm_tokenizer()

    def encode(indices):
        ids, mask = data.encode_batch(tokenizer, [texts[i] for i in indices], max_length)
        return ids, mask, labels[indices]

    return Task(*encode(train_idx), *encode(test_idx))


def load_model(seed: int = 0, path: str | None = None) -> tuple[bert.BertClassifier, dict]:
    """The pretrained encoder under ``bert`` and a freshly initialised ``classifier`` head."""
    config, encoder_params = bert_weights.load_minilm(path)
    model = bert.BertClassifier(config, num_labels=2)
    ids = jnp.zeros((1, 8), jnp.int32)

    def head(key):  # the encoder's init values are unused, so XLA compiles the head's alone
        return {k: v for k, v in model.init(key, ids)["params"].items() if k != "bert"}

    # The same values as initialising the whole model; compiling that took 14.6 s, this 1.3 s.
    params = {
        **jax.jit(head)(jax.random.key(seed)),
        "bert": jax.tree.map(jnp.asarray, encoder_params),
    }
    return model, params


def lora_config(rank: int = 8, alpha: float = 16, targets=("query", "value")) -> jaxlora.LoraConfig:
    """LoRA on the attention projections plus a fully trained classifier head."""
    return jaxlora.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lora_functions(
    model: bert.BertClassifier, config: jaxlora.LoraConfig, mode: str = "factored"
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """``(forward, loss)`` for an adapter, in the forms :func:`predict` and :func:`train` take:
    ``forward((lora, frozen), ids, mask)`` gives logits, ``loss(lora, frozen, ids, mask, labels)``
    the mean cross entropy."""

    def forward(weights, ids, mask):
        lora, frozen = weights
        return apply(model, frozen, lora, config, ids, mask, mode=mode)

    def loss(lora, frozen, ids, mask, labels):
        return cross_entropy(forward((lora, frozen), ids, mask), labels)

    return forward, loss


def train(
    loss: Callable[..., jax.Array],
    trainable: Any,
    frozen: Any,
    task: Task,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Any, list[float], float]:
    """AdamW on ``trainable``; returns the trained tree, the loss per step and seconds per step."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), max(steps, 2), learning_rate * 0.05
    )
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, ids, mask, labels):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids, mask, labels)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    rng = np.random.default_rng(seed)
    losses, start = [], None
    for i in range(steps):
        batch = rng.choice(len(task.train_labels), batch_size, replace=False)
        trainable, opt_state, value = step(
            trainable, opt_state, frozen, task.train_ids[batch], task.train_mask[batch],
            task.train_labels[batch],
        )  # fmt: skip
        losses.append(float(value))
        if i == 0:
            start = time.perf_counter()  # the first step includes compilation
        if progress is not None:
            progress(i, losses[-1])
    per_step = (time.perf_counter() - start) / max(steps - 1, 1) if start else 0.0
    return trainable, losses, per_step


def predict(
    forward: Callable[..., jax.Array], weights: Any, task: Task, batch_size: int = 256
) -> np.ndarray:
    """Logits ``forward(weights, ids, mask)`` on the test split, in fixed-size batches."""
    forward = jax.jit(forward)
    n = len(task.test_labels)
    batch_size = min(batch_size, n)  # a small split is not padded up to a whole batch
    outputs = []
    for start in range(0, n, batch_size):
        ids = task.test_ids[start : start + batch_size]
        mask = task.test_mask[start : start + batch_size]
        pad = batch_size - len(ids)
        if pad:
            ids = np.pad(ids, ((0, pad), (0, 0)))
            mask = np.pad(mask, ((0, pad), (0, 0)))
        outputs.append(np.asarray(forward(weights, ids, mask))[: batch_size - pad])
    return np.concatenate(outputs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())
