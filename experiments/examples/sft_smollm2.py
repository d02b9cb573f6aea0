"""Supervised fine-tuning: LoRA on SmolLM2-135M-Instruct to answer questions about Python.

The data ship with Python itself (``pydoc_data.topics``: the help topics of the language
reference, no network): each section becomes a question ("What does the "with" statement do in
Python?") and an answer (the first two sentences of the section). Prompts use the model's ChatML
template (:func:`~jaxlora.models.llama.weights.chat_prompt`); the loss covers only the answer
tokens and the closing ``<|im_end|>``. Sections are split by title, 15% held out. Prints and
records the held-out answer loss before and after, and a few held-out answers generated before
and after with :func:`jaxlora.models.decoding.generate` (the adapter factored; the merged adapter
is checked to give the same tokens). Writes experiments/results/sft_smollm2.{json,md}.

    python experiments/examples/sft_smollm2.py                 # ~10 minutes on 2 cores (60 steps)
    python experiments/examples/sft_smollm2.py --steps 5       # a quick look
    python experiments/examples/sft_smollm2.py --tiny --steps 2   # random tiny model: the pipeline
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import sys
import time
from pydoc_data.topics import topics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jaxlora  # noqa: E402
from jaxlora.models import llama  # noqa: E402
from jaxlora.models.decoding import generate  # noqa: E402
from jaxlora.models.llama import weights as llama_weights  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
SYSTEM = "You answer questions about the Python language in two sentences."
IM_END = "<|im_end|>"
_UNDERLINE = re.compile(r"([*=\-])\1+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(*])")
_STATEMENT = re.compile(r'The "(\w+)" statement')


def sections(text: str) -> list[tuple[str, list[str]]]:
    """``(title, body lines)`` of each section of a help topic (a title is underlined)."""
    lines = text.split("\n")
    found: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        below = lines[i + 1] if i + 1 < len(lines) else ""
        if lines[i].strip() and _UNDERLINE.fullmatch(below) and len(below) == len(lines[i]):
            found.append((lines[i].strip(), []))
            i += 2
            continue
        if found:
            found[-1][1].append(lines[i])
        i += 1
    return found


def first_paragraph(body: list[str]) -> str | None:
    """The first unindented paragraph (indented lines are grammar, code or lists)."""
    paragraph: list[str] = []
    for line in body:
        if line.strip() and not line.startswith(" "):
            paragraph.append(line.strip())
        elif paragraph:
            break
    # A word hyphenated across lines ("non-" / "numeric") joins without a space.
    return re.sub(r"- ", "-", " ".join(paragraph)) if paragraph else None


def answer_of(body: list[str], sentences: int = 2) -> str | None:
    """The first ``sentences`` sentences of the section's first paragraph."""
    paragraph = first_paragraph(body)
    if paragraph is None:
        return None
    text = " ".join(_SENTENCE_END.split(paragraph)[:sentences]).strip()
    return text[:-1] + "." if text.endswith(":") else text


def question_of(title: str) -> str:
    statement = _STATEMENT.fullmatch(title)
    if statement:
        return f'What does the "{statement[1]}" statement do in Python?'
    return f"In Python, what is meant by “{title}”?"


def qa_pairs() -> list[dict[str, str]]:
    """One question/answer pair per titled section, deduplicated by title (sorted topics)."""
    pairs, seen = [], set()
    for topic in sorted(topics):
        for title, body in sections(topics[topic]):
            answer = answer_of(body)
            if answer and len(answer) > 40 and title.lower() not in seen:
                seen.add(title.lower())
                pairs.append({"topic": topic, "title": title, "question": question_of(title),
                              "answer": answer})  # fmt: skip
    return pairs


def split(pairs: list[dict], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = np.random.default_rng(seed).permutation(len(pairs))
    n = max(1, round(held_out * len(pairs)))
    return [pairs[i] for i in order[n:]], [pairs[i] for i in order[:n]]


def encode(pairs, tokenizer, max_answer: int) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids + <|im_end|>)``; an answer over ``max_answer`` tokens keeps one
    sentence, and is cut (no ``<|im_end|>``) if still too long."""
    end = tokenizer.token_to_id(IM_END)
    out = []
    for pair in pairs:
        prompt = tokenizer.encode(llama_weights.chat_prompt(pair["question"], system=SYSTEM)).ids
        answer = tokenizer.encode(pair["answer"]).ids + [end]
        if len(answer) > max_answer:
            one = _SENTENCE_END.split(pair["answer"])[0]
            answer = (tokenizer.encode(one).ids + [end])[:max_answer]
        out.append((prompt, answer))
    return out


def batch_arrays(examples, length: int) -> dict[str, np.ndarray]:
    """Right-padded ``inputs``, next-token ``targets`` and ``weights`` (1 on answer targets)."""
    n = len(examples)
    inputs, targets = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    weights = np.zeros((n, length), np.float32)
    for i, (prompt, answer) in enumerate(examples):
        tokens = np.asarray(prompt + answer, np.int32)[: length + 1]
        inputs[i, : len(tokens) - 1], targets[i, : len(tokens) - 1] = tokens[:-1], tokens[1:]
        # Target t is token t + 1: the answer starts at target len(prompt) - 1.
        weights[i, len(prompt) - 1 : len(tokens) - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read once per process (parsing the GGUF file's metadata takes
    seconds); the script and its tests only encode and decode with it."""
    return llama_weights.load_smollm2_tokenizer()


def _model(args):
    if not args.tiny:
        return llama_weights.load_smollm2()
    config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                               num_kv_heads=2, head_dim=8)  # fmt: skip
    model = llama.LlamaForCausalLM(config)
    return config, jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma list or 'all-linear'")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-answer", type=int, default=48, help="answer tokens at most")
    parser.add_argument("--held-out", type=float, default=0.15)
    parser.add_argument("--eval-examples", type=int, default=0, help="0: all held-out pairs")
    parser.add_argument("--generate", type=int, default=4, help="held-out questions answered")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="random tiny model (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    model_config, params = _model(args)
    tokenizer = smollm2_tokenizer()
    train_pairs, test_pairs = split(qa_pairs(), args.held_out, args.seed)
    if args.eval_examples:
        test_pairs = test_pairs[: args.eval_examples]
    train_ex = encode(train_pairs, tokenizer, args.max_answer)
    test_ex = encode(test_pairs, tokenizer, args.max_answer)
    longest = max(len(p) + len(a) - 1 for p, a in train_ex + test_ex)
    length = -(-longest // 8) * 8
    train, test = batch_arrays(train_ex, length), batch_arrays(test_ex, length)
    print(f"{len(train_ex)} train / {len(test_ex)} held-out question-answer pairs from "
          f"pydoc_data.topics; sequences of {length} tokens")  # fmt: skip

    model = llama.LlamaForCausalLM(model_config)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    config = jaxlora.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                task_type="CAUSAL_LM")  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(args.seed))
    print(jaxlora.count(frozen, lora))

    def token_losses(lora, frozen, batch):
        logits = jaxlora.apply(model, frozen, lora, config, batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"])

    def loss(lora, frozen, batch):
        total, count = token_losses(lora, frozen, batch)
        return total / count

    eval_sums = jax.jit(token_losses)

    def held_out_loss(lora) -> float:
        total = count = 0.0
        for i in range(0, len(test_ex), args.batch_size):
            chunk = {k: _pad_rows(v[i : i + args.batch_size], args.batch_size)
                     for k, v in test.items()}  # fmt: skip
            t, c = eval_sums(lora, frozen, chunk)
            total, count = total + float(t), count + float(c)
        return total / count

    questions = test_pairs[: args.generate]
    prompts = [tokenizer.encode(llama_weights.chat_prompt(q["question"], system=SYSTEM)).ids
               for q in questions]  # fmt: skip
    end = tokenizer.token_to_id(IM_END)

    def answers(lora, mode="factored"):
        began = time.perf_counter()
        out = generate(model, frozen, prompts, max_new_tokens=args.max_new_tokens, lora=lora,
                       lora_config=config, mode=mode, stop_tokens=[end])  # fmt: skip
        out.tokens.block_until_ready()
        seconds = time.perf_counter() - began
        texts = [tokenizer.decode([int(t) for t in row[:n] if int(t) != end])
                 for row, n in zip(out.tokens, out.lengths, strict=True)]  # fmt: skip
        return texts, np.asarray(out.tokens), int(out.lengths.sum()) / seconds

    before = held_out_loss(lora)
    answers_before, _, _ = answers(lora)  # the fresh adapter (B = 0) is the base model
    print(f"held-out answer loss before: {before:.4f}")
    warmup = min(10, args.steps // 5)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr / 10)
    optimizer = optax.adamw(schedule)
    opt_state = optimizer.init(lora)

    @jax.jit
    def step(lora, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(loss)(lora, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    rng = np.random.default_rng(args.seed)
    losses = []
    train_start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="SFT on Python Q&A", unit="step"):
        rows = rng.choice(len(train_ex), args.batch_size, replace=False)
        batch = {k: jnp.asarray(v[rows]) for k, v in train.items()}
        lora, opt_state, value = step(lora, opt_state, frozen, batch)
        losses.append(float(value))
    train_seconds = time.perf_counter() - train_start
    after = held_out_loss(lora)
    answers_after, tokens_after, tokens_per_s = answers(lora)
    _, tokens_merged, _ = answers(lora, mode="merged")
    print(f"held-out answer loss after {args.steps} steps: {after:.4f} (before {before:.4f})")
    pairs = zip(questions, answers_before, answers_after, strict=True)
    examples = [{"question": q["question"], "reference": q["answer"], "before": b, "after": a}
                for q, b, a in pairs]  # fmt: skip
    for example in examples:
        print(f"\nQ: {example['question']}\n  reference: {example['reference']}\n"
              f"  before: {example['before']}\n  after:  {example['after']}")  # fmt: skip
    command = "python experiments/examples/sft_smollm2.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result = {
        "command": command.strip(),
        "model": "random tiny Llama" if args.tiny else "SmolLM2-135M-Instruct",
        "data": "pydoc_data.topics (Python language reference help topics)",
        "train_pairs": len(train_ex), "held_out_pairs": len(test_ex), "seq_len": length,
        "targets": args.targets, "rank": args.rank, "alpha": args.alpha, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr,
        "trainable": jaxlora.count(frozen, lora).trainable,
        "held_out_loss_before": before, "held_out_loss_after": after,
        "train_loss_first10": float(np.mean(losses[:10])),
        "train_loss_last10": float(np.mean(losses[-10:])),
        "train_seconds": train_seconds,
        "generation_tokens_per_s": tokens_per_s,
        "merged_generation_agrees": bool((tokens_merged == tokens_after).all()),
        "examples": examples,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sft_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sft_smollm2.md").write_text(_markdown(result))
    return result


def _pad_rows(array: np.ndarray, rows: int) -> jax.Array:
    """``array`` with zero rows appended up to ``rows`` (zero weight: they count for nothing)."""
    return jnp.asarray(np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]),
                                                       array.dtype)]))  # fmt: skip


def _markdown(result: dict) -> str:
    lines = [
        f"Made by `{result['command']}` ({result['seconds']:.0f} s; training "
        f"{result['train_seconds']:.0f} s).",
        "",
        f"{result['model']}, LoRA r={result['rank']} on {result['targets']} "
        f"({result['trainable']:,} trainable), {result['steps']} steps of {result['batch_size']}, "
        f"on {result['train_pairs']} question/answer pairs from {result['data']}; loss on the "
        f"answer tokens only; {result['held_out_pairs']} pairs held out (by section title).",
        "",
        "| held-out answer loss before | after | train loss first 10 steps | last 10 | "
        "generation tokens/s | merged = factored tokens |",
        "|---|---|---|---|---|---|",
        f"| {result['held_out_loss_before']:.4f} | {result['held_out_loss_after']:.4f} | "
        f"{result['train_loss_first10']:.4f} | {result['train_loss_last10']:.4f} | "
        f"{result['generation_tokens_per_s']:.1f} | {result['merged_generation_agrees']} |",
        "",
        "Held-out questions, greedy answers before and after:",
    ]
    for example in result["examples"]:
        lines += ["", f"**Q:** {example['question']}", "",
                  f"- reference: {example['reference']}", f"- before: {example['before']}",
                  f"- after: {example['after']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
