"""scripts/ncu_source.py on a committed ncu export (the session-13 baseline int8 decode kernel)."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "benchmarks" / "results" / "source_int8_s13_baseline.csv.gz"


@pytest.mark.skipif(not CSV.exists(), reason="needs the repository's benchmarks/results")
def test_summary_counts_steps_and_loop(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ncu_source.py", str(CSV), "--hot", "3"])
    runpy.run_path(str(ROOT / "scripts" / "ncu_source.py"), run_name="__main__")
    out = capsys.readouterr().out
    # 8 sequences x 8 KV heads x 32768 / 16 tokens = 131,072 warp steps; 63.4 M instructions in all.
    assert "instructions 63,417,680" in out and "steps 131,072" in out and "429 per step" in out
    assert "by reason: wait 25.9%" in out
    assert len([line for line in out.splitlines() if line.startswith("  0x")]) == 3
