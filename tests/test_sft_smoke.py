"""experiments/examples/sft_smollm2.py: its data, its answer-only loss mask, a tiny full run."""

import json

import numpy as np
import pytest

from experiments.examples import sft_smollm2

pytestmark = pytest.mark.slow  # the SmolLM2 tokenizer, and a tiny run of the script


def test_question_answer_pairs_from_pydoc_topics():
    pairs = sft_smollm2.qa_pairs()
    assert len(pairs) > 100
    titles = [p["title"].lower() for p in pairs]
    assert len(set(titles)) == len(titles)
    by_question = {p["question"]: p["answer"] for p in pairs}
    answer = by_question['What does the "with" statement do in Python?']
    assert answer.startswith('The "with" statement is used to wrap the execution of a block')
    train, held_out = sft_smollm2.split(pairs, 0.15, seed=0)
    assert len(held_out) == round(0.15 * len(pairs)) and len(train) + len(held_out) == len(pairs)
    assert not {p["title"] for p in train} & {p["title"] for p in held_out}


def test_loss_mask_covers_exactly_the_answer():
    tokenizer = sft_smollm2.smollm2_tokenizer()  # the tiny run's tokenizer, read once
    pair = {"question": "What is x?", "answer": "It is a name. It names a value."}
    examples = sft_smollm2.encode([pair], tokenizer, max_answer=48)
    prompt, answer = examples[0]
    assert answer[-1] == tokenizer.token_to_id("<|im_end|>")
    arrays = sft_smollm2.batch_arrays(examples, length=len(prompt) + len(answer) + 5)
    weights = arrays["weights"][0]
    np.testing.assert_array_equal(arrays["targets"][0][weights > 0], answer)
    np.testing.assert_array_equal(arrays["inputs"][0][: len(prompt)], prompt)
    assert weights.sum() == len(answer) and weights[-5:].sum() == 0  # padding never counts
    # A long answer keeps its first sentence only.
    long = {"question": "Q?", "answer": "Short first sentence. " + "Long " * 80 + "end."}
    ((_, cut),) = sft_smollm2.encode([long], tokenizer, max_answer=16)
    assert tokenizer.decode(cut[:-1]) == "Short first sentence."


@pytest.mark.standard_dtypes  # optax's AdamW
def test_tiny_run_writes_results(tmp_path):
    """The script's own main, in this process (no second JAX start)."""
    argv = ["--tiny", "--steps", "2", "--eval-examples", "4", "--generate", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    returned = sft_smollm2.main(argv)
    result = json.loads((tmp_path / "sft_smollm2.json").read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["held_out_pairs"] == 4 and result["steps"] == 2
    assert np.isfinite([result["held_out_loss_before"], result["held_out_loss_after"]]).all()
    assert result["merged_generation_agrees"] is True
    assert len(result["examples"]) == 2 and result["generation_tokens_per_s"] > 0
    assert "| held-out answer loss before |" in (tmp_path / "sft_smollm2.md").read_text()
