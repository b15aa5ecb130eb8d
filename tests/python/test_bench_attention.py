"""The attention benchmark's CLI on the CPU: one tiny point, its table and JSON fields."""

import json
import time

import torch

from pagedkv.bench import attention
from pagedkv.bench.timing import median_time_us, stream_time_us


def test_attention_bench_cpu_point(tmp_path, capsys):
    out = tmp_path / "attention.json"
    attention.main(["--device", "cpu", "--shapes", "llama3.2-1b", "--batches", "1", "--contexts", "256",
                    "--formats", "int8", "int4", "--reps", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| llama3.2-1b | 1 | 256 | int8 |" in table
    recs = json.loads(out.read_text())["results"]
    assert [r["method"] for r in recs] == ["sdpa float32", "int8", "int4"]
    for r in recs:
        assert r["us"] > 0 and r["us_stream"] > 0 and r["gbs"] > 0
        assert abs(r["speedup_stream"] - recs[0]["us_stream"] / r["us_stream"]) < 1e-9
    # Against the dense fp32 answer (measured: int8 0.004, int4 0.05): the error of the formats, not a broken harness.
    assert recs[1]["max_abs_err_vs_dense"] < 0.02 and recs[2]["max_abs_err_vs_dense"] < 0.2


def test_stream_time_on_cpu_is_the_per_call_time():
    calls = []
    us = stream_time_us(lambda: calls.append(1), torch.device("cpu"), reps=4, warmup=2)
    assert us >= 0 and len(calls) == 6  # CPU: the same as median_time_us (warmup + reps)
    assert median_time_us(lambda: time.sleep(0.002), torch.device("cpu"), reps=3) >= 2000  # µs, not s or ms


def test_attention_bench_block_sizes(tmp_path):
    out = tmp_path / "attention.json"
    attention.main(["--device", "cpu", "--shapes", "llama3.2-1b", "--batches", "1", "--contexts", "256",
                    "--formats", "int8", "--block-sizes", "16", "64", "--reps", "1", "--json", str(out)])
    recs = json.loads(out.read_text())["results"]
    assert [(r["method"], r.get("block_size")) for r in recs] == [("sdpa float32", None), ("int8 bs16", 16),
                                                                  ("int8 bs64", 64)]
    # 256 tokens fill 16 pages of 16 or 4 of 64: the same bytes up to the per-page scales' layout.
    assert abs(recs[1]["bytes"] - recs[2]["bytes"]) / recs[1]["bytes"] < 0.01
    assert recs[1]["max_abs_err_vs_dense"] < 0.02 and recs[2]["max_abs_err_vs_dense"] < 0.02
