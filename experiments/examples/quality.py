"""Quality: a frozen encoder + head vs LoRA at several ranks vs full fine-tuning, same budget.

The paper's claim is that LoRA matches full fine-tuning while training a tiny fraction of the
parameters. Every variant here trains all-MiniLM-L6-v2 on Rotten Tomatoes with the same steps,
batch, data order and seed; only what is trainable (and its learning rate) differs. Writes
experiments/results/quality.{json,md}.

    python experiments/examples/quality.py                    # the full table (~20-30 min, 2 cores)
    python experiments/examples/quality.py --ranks 8 --steps 20 --n-test 128   # a quick look
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jaxlora  # noqa: E402
from experiments.examples import sentiment  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def run_lora(model, params, task, rank, args):
    config = sentiment.lora_config(rank, 2 * rank if args.alpha is None else args.alpha)
    frozen, lora = jaxlora.split(params, config, jax.random.key(args.seed))

    forward, loss = sentiment.lora_functions(model, config)

    lora, losses, per_step = sentiment.train(
        loss, lora, frozen, task, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lora_lr, seed=args.seed,
    )  # fmt: skip
    logits = sentiment.predict(forward, (lora, frozen), task)
    return size(lora), logits, losses, per_step


def run_head_only(model, params, task, args):
    frozen = {k: v for k, v in params.items() if k != "classifier"}

    def forward(weights, ids, mask):
        head, frozen = weights
        return model.apply({"params": {**frozen, "classifier": head}}, ids, mask)

    def loss(head, frozen, ids, mask, labels):
        return sentiment.cross_entropy(forward((head, frozen), ids, mask), labels)

    head, losses, per_step = sentiment.train(
        loss, params["classifier"], frozen, task, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lora_lr, seed=args.seed,
    )  # fmt: skip
    logits = sentiment.predict(forward, (head, frozen), task)
    return size(head), logits, losses, per_step


def run_full(model, params, task, args):
    def forward(params, ids, mask):
        return model.apply({"params": params}, ids, mask)

    def loss(params, _, ids, mask, labels):
        return sentiment.cross_entropy(forward(params, ids, mask), labels)

    params, losses, per_step = sentiment.train(
        loss, params, None, task, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.full_lr, seed=args.seed,
    )  # fmt: skip
    logits = sentiment.predict(forward, params, task)
    return size(params), logits, losses, per_step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,64")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--n-test", type=int, default=None, help="default: all 2,550")
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    task = sentiment.load_task(args.max_length, n_test=args.n_test, seed=args.seed)
    model, params = sentiment.load_model(args.seed)
    total = size(params)
    variants = [("frozen encoder + head", lambda: run_head_only(model, params, task, args))]
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        variants.append(
            (f"LoRA r={rank} (q,v) + head", lambda r=rank: run_lora(model, params, task, r, args))
        )  # noqa: E501
    if not args.skip_full:
        variants.append(("full fine-tuning", lambda: run_full(model, params, task, args)))
    rows = []
    for name, run in variants:
        start = time.perf_counter()
        trainable, logits, losses, per_step = run()
        rows.append({
            "variant": name, "trainable": trainable, "trainable_percent": 100 * trainable / total,
            "accuracy": sentiment.accuracy(logits, task.test_labels),
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "ms_per_step": 1e3 * per_step, "seconds": time.perf_counter() - start,
        })  # fmt: skip
        print(f"{name:28s} trainable {trainable:>11,} ({rows[-1]['trainable_percent']:.3f}%)  "
              f"accuracy {rows[-1]['accuracy']:.4f}  {rows[-1]['ms_per_step']:.0f} ms/step",
              flush=True)  # fmt: skip
    command = "python experiments/examples/quality.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        f"Made by `{command.strip()}`: all-MiniLM-L6-v2 on Rotten Tomatoes, {args.steps} steps of "
        f"batch {args.batch_size}, {args.max_length} tokens, seed {args.seed}, "
        f"{len(task.test_labels):,} test snippets.\n",
        "| variant | trainable | trainable % | test accuracy | train loss (last 20) | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['trainable']:,} | {row['trainable_percent']:.3f} | "
            f"{row['accuracy']:.4f} | {row['final_train_loss']:.4f} | {row['ms_per_step']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    (args.out / "quality.md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
