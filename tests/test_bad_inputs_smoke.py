"""The bad-inputs battery's quick subset runs to the end and reports a percentage.

The percentage is a measurement of how clearly the API rejects wrong inputs, not a pass mark:
no threshold is asserted here.
"""

import math

import pytest

from experiments.validation import bad_inputs

pytestmark = pytest.mark.slow  # runs a script from experiments/ (its smoke tests are all slow)


def test_quick_battery_completes_and_reports_a_percentage(tmp_path, capsys):
    out = tmp_path / "bad_inputs.json"
    result = bad_inputs.main(["--quick", "--out", str(out)])
    assert 30 <= result["cases"] <= 45
    assert result["harness_errors"] == 0
    percent = result["percent"]
    assert set(percent) == {"clear", "obscure", "silent"}
    assert all(0.0 <= p <= 100.0 for p in percent.values())
    assert math.isclose(sum(percent.values()), 100.0)
    assert out.exists()
    assert "% clear" in capsys.readouterr().out
