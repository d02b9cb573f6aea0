"""The paper's parameter tables, reproduced on abstract shapes."""

import json

import pytest

from experiments.examples import paper_param_tables

pytestmark = pytest.mark.slow  # runs experiments/examples/paper_param_tables.py


def test_paper_tables(tmp_path):
    rows = paper_param_tables.main(["--out", str(tmp_path)])
    by_key = {(r["model"], r["targets"], r["r"]): r for r in rows}
    assert by_key[("RoBERTa base", "W_q+W_v", 8)]["jaxlora_trainable"] == 294_912
    assert by_key[("RoBERTa large", "W_q+W_v", 8)]["jaxlora_trainable"] == 786_432
    assert by_key[("DeBERTa XXL", "W_q+W_v", 16)]["jaxlora_trainable"] == 4_718_592
    assert by_key[("GPT-3 175B", "W_q+W_v", 1)]["jaxlora_trainable"] == 4_718_592
    assert by_key[("GPT-3 175B", "W_q+W_v", 8)]["jaxlora_trainable"] == 37_748_736
    assert {r["jaxlora_trainable"] for r in rows if r["table"] == "Table 5"} == {18_874_368}
    assert all(r["jaxlora_trainable"] == r["formula_2_L_d_r"] for r in rows)
    disagree = {r["model"] for r in rows if not r["agrees_with_paper"]}
    assert disagree == {"GPT-2 medium", "GPT-2 large"}
    assert json.loads((tmp_path / "paper_param_tables.json").read_text()) == rows
