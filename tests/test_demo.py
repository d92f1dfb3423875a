# SPDX-License-Identifier: Apache-2.0
"""`vkv demo` on the CPU (three tiny random models, host pages, Triton's interpreter), as the README runs it:
both policies finish, no request is lost, the sampled KV never exceeds the budget, the idle model answers."""

import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.mark.parametrize("mode", ["one-process", "processes"])
def test_the_cpu_demo_runs_and_loses_nothing(tmp_path, mode):
    out = tmp_path / "demo.json"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vkv.cli", "demo", "--device", "cpu", "--mode", mode, "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    took = time.monotonic() - start
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    payload = json.loads(out.read_text())
    runs = {run["policy"]: run for run in payload["runs"]}
    assert set(runs) == {"static", "elastic"}
    for run in runs.values():
        assert run["requests"] > 10 and run["completed"] == run["requests"] and run["lost"] == 0, run["errors"]
        assert run["within_budget"] and 0 < run["max_held_bytes"] <= payload["scenario"]["kv_budget_bytes"]
        probe = run["idle_probe"]
        assert probe["idle_mapped_bytes_before"] <= probe["mapped_bytes_at_rest"] and probe["idle_ttft_s"] > 0
        assert run["ttft_p99_s"] >= run["ttft_p50_s"] > 0
    assert "static" in done.stdout and "elastic" in done.stdout and (tmp_path / "demo.png").exists()
    print(f"\nvkv demo --mode {mode} on the CPU: {took:.0f} s")
