"""The compiled JAX step (or forward) that every JAX row of ``bench_train_step.py`` times."""

from __future__ import annotations

import contextlib
import copy
import re
import resource
import time

import jax
import optax

from experiments.benchmarks import models_gpt

#: An inference turn times this many forwards (after one untimed forward) and reports their mean:
#: a ~0.5 s forward timed once right after another row's program ran is mostly cache noise.
INFER_REPEATS = 3
_COMPILER_OPTIONS: dict[str, object] = {}


@contextlib.contextmanager
def compiler_options(options: dict[str, object]):
    """XLA options (``DebugOptions`` fields, as ``XLA_FLAGS`` takes them without ``--``) for the
    runners built inside, so that one process can time the same step compiled both ways."""
    saved = dict(_COMPILER_OPTIONS)
    _COMPILER_OPTIONS.update(options)
    try:
        yield
    finally:
        _COMPILER_OPTIONS.clear()
        _COMPILER_OPTIONS.update(saved)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _xla_memory(compiled) -> dict[str, float]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {"temp_mb": round(stats.temp_size_in_bytes / 2**20, 1)}


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


class JaxRunner:
    """One configuration, compiled ahead of time; :meth:`run` times one step (or forward).

    Args:
        name: the row's name; group: the model group (ratios are to the group's full FT).
        forward: ``forward(trainable, frozen, inputs, key) -> logits``.
        trainable, frozen: the trained tree and everything else (None for full fine-tuning).
        batch: ``int[batch, seq + 1]`` token ids.
        kind: ``"train"`` (AdamW step on ``trainable``) or ``"infer"`` (forward only).
    """

    def __init__(self, name, group, forward, trainable, frozen, batch, kind="train"):
        rss_before = _rss_mb()
        self.name, self.group, self.kind = name, group, kind
        self.trainable = _size(trainable) if kind == "train" else 0
        inputs, targets = batch[:, :-1], batch[:, 1:]
        self.key = jax.random.key(7)
        if kind == "train":
            opt = optax.adamw(1e-4)

            def step(trainable, opt_state, frozen, key):
                def loss_fn(t):
                    return models_gpt.next_token_loss(forward(t, frozen, inputs, key), targets)

                loss, grads = jax.value_and_grad(loss_fn)(trainable)
                updates, opt_state = opt.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, loss

            # A copy: the step donates its trainable tree, which other runners may share.
            trainable = jax.tree.map(lambda x: x.copy(), trainable)
            self.args = [trainable, opt.init(trainable), frozen]
            self.fn = jax.jit(step, donate_argnums=(0, 1))
        else:
            self.args = [trainable, frozen]
            self.fn = jax.jit(lambda t, f, key: forward(t, f, inputs, key))
        self.lowered = self.fn.lower(*self.args, self.key)
        self._compile(rss_before)

    def _compile(self, rss_before: float) -> None:
        self.fn = self.lowered.compile(dict(_COMPILER_OPTIONS) or None)
        self.memory = _xla_memory(self.fn)
        self.run()  # the first call, outside the timings
        self.memory["rss_delta_mb"] = round(_rss_mb() - rss_before, 1)
        self.times: list[float] = []

    def recompiled(self, group: str) -> JaxRunner:
        """The same step in another row of ``group``, compiled again from the same lowered program
        with the current :func:`compiler_options` (tracing it again would give the same program)."""
        rss_before = _rss_mb()
        twin = copy.copy(self)
        twin.group = group
        twin.args = list(self.args)
        if self.kind == "train":  # a step donates the trainable tree and optimizer state
            twin.args[:2] = jax.tree.map(lambda x: x.copy(), self.args[:2])
        twin._compile(rss_before)
        return twin

    def program(self) -> str:
        """The compiled program's HLO without source locations, so that two runners compare equal
        exactly when XLA compiled the same program for them."""
        text = re.sub(r"metadata=\{[^}]*\}", "", self.fn.as_text())
        return "\n".join(line for line in text.splitlines() if "file_name_id=" not in line)

    def run(self) -> float:
        """Seconds of one training step, or the mean of :data:`INFER_REPEATS` forwards."""
        if self.kind == "infer":
            jax.block_until_ready(self.fn(*self.args, self.key))
            start = time.perf_counter()
            for _ in range(INFER_REPEATS):
                jax.block_until_ready(self.fn(*self.args, self.key))
            return (time.perf_counter() - start) / INFER_REPEATS
        self.key = jax.random.fold_in(self.key, 1)  # a fresh dropout mask each step
        start = time.perf_counter()
        out = self.fn(*self.args, self.key)
        self.args[:2] = out[:2]
        jax.block_until_ready(out)
        return time.perf_counter() - start
