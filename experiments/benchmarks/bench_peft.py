"""The PyTorch / PEFT side of the benchmark: the same GPT-2-style decoder and the same LoRA work.

Run by ``bench_train_step.py --peft`` as a worker process of its own (:func:`serve`), so PyTorch's
and XLA's thread pools never share a process; the driver alternates the frameworks' turns.
Needs the ``bench`` extra (torch, transformers, peft); nothing here is used by the library.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from experiments.benchmarks.gpt_config import GPTConfig

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out"]


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.ln_1, self.ln_2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(c.d_model, c.d_model))
        self.fc_in, self.fc_out = nn.Linear(c.d_model, c.mlp), nn.Linear(c.mlp, c.d_model)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln_1(x)
        split = lambda u: u.view(b, t, self.c.heads, d // self.c.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.d_model), nn.Embedding(c.seq, c.d_model)
        self.h = nn.ModuleList([Block(c) for _ in range(c.layers)])
        self.ln_f = nn.LayerNorm(c.d_model)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))[None]
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head


class Runner:
    """One configuration: a model (full or PEFT-wrapped), its AdamW, and timed step / forward."""

    def __init__(
        self, c: GPTConfig, base: GPT, targets, r: int, alpha: float, batch: int, dropout=0.0,
        floor: bool = False,
    ):  # fmt: skip
        model = copy.deepcopy(base)
        if floor:  # the floor (bench_baselines.py): only the targets' biases train
            for name, p in model.named_parameters():
                module, _, leaf = name.rpartition(".")
                p.requires_grad_(leaf == "bias" and module.rpartition(".")[2] in targets)
        elif targets is not None:
            config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)
            model = get_peft_model(model, config)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        # fused=True: one pass over the parameters, as XLA fuses optax's AdamW; the default CPU
        # for-loop AdamW spends ~1.9 s of a ~5.7 s full-FT step in 7 separate passes.
        self.opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        gen = torch.Generator().manual_seed(0)
        self.batch = torch.randint(0, c.vocab, (batch, c.seq + 1), generator=gen)

    def step(self) -> float:
        start = time.perf_counter()
        logits = self.model(self.batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.batch[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    @torch.no_grad()
    def forward(self) -> float:
        start = time.perf_counter()
        self.model(self.batch[:, :-1])
        return time.perf_counter() - start


def runners(c: GPTConfig, r: int, alpha: float, batch: int, names=None) -> dict[str, Runner]:
    """Full fine-tuning, PEFT LoRA on q,v and on all linear layers, and the floors of both
    (only the target layers' biases train), from one base model; only those in ``names`` if
    given."""
    torch.manual_seed(0)
    base = GPT(c)
    qv = ["q_proj", "v_proj"]
    configs = {
        "torch full FT": (None, 0.0, False),
        "PEFT LoRA q,v": (qv, 0.0, False),
        "PEFT LoRA all-linear": (ALL_LINEAR, 0.0, False),
        "PEFT LoRA all-linear, dropout 0.1": (ALL_LINEAR, 0.1, False),
        "torch floor q,v": (qv, 0.0, True),
        "torch floor all-linear": (ALL_LINEAR, 0.0, True),
    }
    return {
        name: Runner(c, base, targets, r, alpha, batch, dropout, floor)
        for name, (targets, dropout, floor) in configs.items()
        if names is None or name in names
    }


def serve(argv=None) -> None:
    """A worker process: builds the runners, then answers ``NAME\\tstep|forward`` lines on stdin
    with the seconds taken (or ``trainable NAME``). ``bench_train_step.py --peft`` drives it, so
    PyTorch never shares a process (and its thread pools) with XLA, yet the steps interleave."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="{}", help="GPTConfig fields as JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    args = parser.parse_args(argv)
    config = GPTConfig(**json.loads(args.model))
    all_runners = runners(config, args.r, args.alpha, args.batch)
    print("ready", flush=True)
    for line in sys.stdin:
        name, what = line.rstrip("\n").split("\t")
        runner = all_runners[name]
        value = runner.trainable if what == "trainable" else getattr(runner, what)()
        print(value, flush=True)


if __name__ == "__main__":
    serve()
