"""Equinox models written for the tests: a GRU-style recurrent cell built from ``eqx.nn.Linear``
layers, run over a sequence by ``jax.lax.scan``.

Equinox's own ``eqx.nn.GRUCell`` keeps both of its weights in one module, as ``weight_ih`` and
``weight_hh``, which LoRA cannot adapt (one weight leaf per module); a cell written with one Linear
per weight can be. Each model is built once per run (``functools.cache``), so tests reuse the
same compiled programs.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

eqx = pytest.importorskip("equinox")

WIDTH = 4
STEPS = 3


class GRU(eqx.Module):
    """``h' = (1 - z)·n + z·h`` with gates from ``input_gates(x)`` and ``hidden_gates(h)``, the
    same weights at every step; ``head`` reads each step's hidden state."""

    input_gates: eqx.nn.Linear  # (3·hidden, in): reset, update and candidate stacked
    hidden_gates: eqx.nn.Linear  # (3·hidden, hidden)
    head: eqx.nn.Linear

    def __init__(self, key, width=WIDTH):
        k1, k2, k3 = jax.random.split(key, 3)
        self.input_gates = eqx.nn.Linear(width, 3 * width, key=k1)
        self.hidden_gates = eqx.nn.Linear(width, 3 * width, key=k2)
        self.head = eqx.nn.Linear(width, width, key=k3)

    def step(self, h, x):
        r_x, z_x, n_x = jnp.split(self.input_gates(x), 3)
        r_h, z_h, n_h = jnp.split(self.hidden_gates(h), 3)
        r, z = jax.nn.sigmoid(r_x + r_h), jax.nn.sigmoid(z_x + z_h)
        n = jnp.tanh(n_x + r * n_h)
        h = (1 - z) * n + z * h
        return h, h

    def __call__(self, xs):
        """``xs`` (steps, in) -> (steps, out): the carry flows through ``lax.scan``."""
        h0 = jnp.zeros(self.hidden_gates.in_features, xs.dtype)
        # A lambda, not the bound method: lax.scan hashes its function, and a bound method of a
        # Module hashes the module's fields, traced arrays under jit.
        _, hs = jax.lax.scan(lambda h, x: self.step(h, x), h0, xs)
        return jax.vmap(self.head)(hs)


@functools.cache
def gru():
    return GRU(jax.random.key(0))


@functools.cache
def sequence():
    with jax.ensure_compile_time_eval():  # concrete even when first asked for inside a trace
        return jax.random.normal(jax.random.key(1), (STEPS, WIDTH))


class WithCell(eqx.Module):
    """Equinox's own recurrent cell (``weight_ih`` / ``weight_hh``) beside a Linear head."""

    cell: eqx.Module
    head: eqx.nn.Linear


@functools.cache
def with_cell(kind):
    k1, k2 = jax.random.split(jax.random.key(0))
    cell = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[kind](WIDTH, WIDTH, key=k1)
    return WithCell(cell, eqx.nn.Linear(WIDTH, WIDTH, key=k2))
