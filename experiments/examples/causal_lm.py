"""Causal LM: LoRA on SmolLM2-135M-Instruct (real weights from a GGUF file) over Hamlet.

The text is cut into fixed-length windows; the last 10% of the tokens are held out. Prints and
records the held-out next-token loss before and after LoRA fine-tuning. Writes
experiments/results/causal_lm.{json,md}.

    python experiments/examples/causal_lm.py                  # ~10 minutes on 2 CPU cores
    python experiments/examples/causal_lm.py --steps 5 --eval-windows 4 --seq-len 64  # quick look
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jaxlora  # noqa: E402
from jaxlora import apply  # noqa: E402
from jaxlora.models import data, llama  # noqa: E402
from jaxlora.models.llama import weights as llama_weights  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    n = (len(tokens) - 1) // seq_len
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma list or 'all-linear'")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    model_config, params = llama_weights.load_smollm2()
    tokenizer = llama_weights.load_smollm2_tokenizer()
    tokens = np.asarray(tokenizer.encode(data.hamlet_text()).ids, np.int32)
    cut = int(0.9 * len(tokens))
    train, held_out = windows(tokens[:cut], args.seq_len), windows(tokens[cut:], args.seq_len)
    held_out = held_out[: args.eval_windows]
    model = llama.LlamaForCausalLM(model_config)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    config = jaxlora.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                task_type="CAUSAL_LM")  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(args.seed))
    print(f"SmolLM2-135M on Hamlet: {len(tokens):,} tokens, {len(train)} train windows of "
          f"{args.seq_len}, {len(held_out)} held-out windows")  # fmt: skip
    print(jaxlora.count(frozen, lora))

    def loss(lora, frozen, window):
        logits = apply(model, frozen, lora, config, window[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()

    eval_loss = jax.jit(loss)

    def held_out_loss(lora):
        values = [eval_loss(lora, frozen, held_out[i : i + 1]) for i in range(len(held_out))]
        return float(np.mean(values))

    before = held_out_loss(lora)
    print(f"held-out loss before: {before:.4f}")
    optimizer = optax.adamw(optax.cosine_decay_schedule(args.lr, args.steps, 0.1))
    opt_state = optimizer.init(lora)

    @jax.jit
    def step(lora, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(loss)(lora, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    rng = np.random.default_rng(args.seed)
    losses = []
    for _ in tqdm(range(args.steps), desc="LoRA on Hamlet", unit="step"):
        batch = jnp.asarray(train[rng.choice(len(train), args.batch_size, replace=False)])
        lora, opt_state, value = step(lora, opt_state, frozen, batch)
        losses.append(float(value))
    after = held_out_loss(lora)
    print(f"held-out loss after {args.steps} steps: {after:.4f} (before {before:.4f})")
    command = "python experiments/examples/causal_lm.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result = {
        "command": command.strip(), "targets": args.targets, "rank": args.rank,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "trainable": jaxlora.count(frozen, lora).trainable, "held_out_loss_before": before,
        "held_out_loss_after": after, "train_loss_first10": float(np.mean(losses[:10])),
        "train_loss_last10": float(np.mean(losses[-10:])),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "causal_lm.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "causal_lm.md").write_text(
        f"Made by `{result['command']}`.\n\n| model | targets | r | trainable | held-out loss "
        f"before | after |\n|---|---|---|---|---|---|\n| SmolLM2-135M-Instruct | {args.targets} | "
        f"{args.rank} | {result['trainable']:,} | {before:.4f} | {after:.4f} |\n"
    )
    return result


if __name__ == "__main__":
    main()
