"""`msscale demo --quick` end to end, as CI runs it: the README's main command, smaller."""

import json
import subprocess
import sys

import pytest

from msscale.certify.report import RADIUS_GRID

METHODS = {f"{method} ({unet})" for unet in ("pretrained", "fine-tuned")
           for method in ("cohen sigma=0.25", "cohen sigma=0.5", "cohen sigma=1", "cascade",
                          "cascade, paper's rule")}


@pytest.mark.slow
def test_quick_demo_writes_the_table_and_the_picture(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "msscale", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == METHODS
    assert {"n", "n0", "alpha", "images", "seconds"} <= set(summary)
    for method in summary["methods"].values():
        accuracy = method["certified_accuracy"]
        assert set(accuracy) == {str(r) for r in RADIUS_GRID}
        values = [accuracy[str(r)] for r in RADIUS_GRID]
        assert values == sorted(values, reverse=True) and 0 <= values[-1] <= values[0] <= 1
        assert 0 <= method["abstain"] <= 1 and method["acr"] >= 0
    # the pretrained demo models are real: at sigma=0.25 most clean digits are recovered
    assert summary["methods"]["cohen sigma=0.25 (pretrained)"]["certified_accuracy"]["0.0"] >= 0.5
    report = (out / "report.md").read_text()
    assert all(name in report for name in METHODS)
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "finetune" / "final").is_dir()
