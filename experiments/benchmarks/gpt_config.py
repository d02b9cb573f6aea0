"""The sizes of the benchmark GPT (``models_gpt.py``), in a module that imports no JAX: the
PyTorch side of the benchmarks (``bench_peft.py``, ``profile_step.py``'s PyTorch worker) builds the
same model from them without paying for JAX's import."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8192
    d_model: int = 768
    heads: int = 12
    layers: int = 4
    mlp: int = 3072
    seq: int = 128


#: The smoke tests' model: one block runs every code path and compiles in half the time.
TINY = GPTConfig(vocab=64, d_model=32, heads=2, layers=1, mlp=64, seq=16)
