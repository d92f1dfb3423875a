# SPDX-License-Identifier: Apache-2.0
"""`vkv demo` on the CPU (three tiny random models, host pages, Triton's interpreter), as the README runs it:
both policies finish, no request is lost, the sampled KV never exceeds the budget, the idle model answers."""

import json
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.mark.cpu_kernels
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
    models = ("m0", "m1", "m2")
    assert set(runs) == {"static", "elastic"}
    assert payload["environment"]["device"] and payload["environment"]["torch"] == torch.__version__
    for run in runs.values():
        assert run["requests"] > 10 and run["completed"] == run["requests"] and run["lost"] == 0, run["errors"]
        assert "server_logs" not in run  # kept only where a request was lost or a server failed
        assert run["device_full"] == 0 == run["forward_out_of_memory"]  # host pages: the memory never ran out
        assert set(run["samples"][-1]["vkv_kv_device_full"]) == {"m0", "m1", "m2"}  # read, not defaulted
        assert run["max_gpu_used_bytes"] is None and run["torch_peak_reserved_bytes"] == dict.fromkeys(models, 0.0)
        assert run["within_budget"] and 0 < run["max_held_bytes"] <= payload["scenario"]["kv_budget_bytes"]
        # each model's peaks: KV in use within its bound (a static share, or the whole budget), requests at once
        # within max_num_seqs (a sample caught some running)
        bound = payload["scenario"]["kv_budget_bytes"] // (3 if run["policy"] == "static" else 1)
        assert set(run["max_in_use_bytes"]) == set(models) and all(
            0 < b <= bound for b in run["max_in_use_bytes"].values()
        )
        running = run["max_running"].values()
        assert all(0 <= n <= payload["scenario"]["max_num_seqs"] for n in running) and max(running) >= 1
        assert set(run["max_running"]) == set(run["max_waiting"]) == set(models)
        probe = run["idle_probe"]
        assert probe["idle_mapped_bytes_before"] <= probe["mapped_bytes_at_rest"] and probe["idle_ttft_s"] > 0
        assert run["ttft_p99_s"] >= run["ttft_p50_s"] > 0
        timed = run["requests_timed"]  # [model, arrival, ttft, done] a request, in arrival order
        assert len(timed) == run["requests"] and {t[0] for t in timed} == {0, 1, 2}
        assert [t[1] for t in timed] == sorted(t[1] for t in timed)
        assert all(0 < ttft <= done for _, _, ttft, done in timed) and max(t[2] for t in timed) >= run["ttft_p99_s"]
    assert "static" in done.stdout and "elastic" in done.stdout and (tmp_path / "demo.png").exists()
    print(f"\nvkv demo --mode {mode} on the CPU: {took:.0f} s")


def test_a_servers_log_tail_has_its_warnings_and_errors_then_its_last_lines(tmp_path):
    from vkv.demo import _log_tail

    said = ["t WARNING vkv.engine: model m0: the device had no memory", "t ERROR vkv.engine: model m1: a step failed"]
    lines = [said[0], *(f"line {i}" for i in range(50)), said[1], *(f"line {i}" for i in range(50, 100))]
    (tmp_path / "s.log").write_text("\n".join(lines))
    assert _log_tail(tmp_path / "s.log", lines=5).splitlines() == said + lines[-5:]
    assert _log_tail(tmp_path / "missing.log") == ""


def test_the_gpu_scenario_is_whole_pages_and_outgrows_a_static_share():
    """The H200 load point's budget is whole 2 MiB pages, and so is a third of it (the server refuses others: the
    elastic server gets the whole, a static one a share in mode "processes"), and a model's static third
    of it holds fewer full-length requests than the model may run at once: else the policies could not differ."""
    from vkv.demo import gpu_scenario
    from vkv.engine.presets import preset

    sc = gpu_scenario()
    assert sc.kv_budget_bytes % (2 << 20) == 0 and sc.kv_budget_bytes > 0
    assert sc.kv_budget_bytes // sc.num_models % (2 << 20) == 0  # a static share, one server a model
    config = preset(sc.model.removeprefix("random:"))
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2  # K and V, bf16
    share = sc.kv_budget_bytes // sc.num_models
    assert share // (per_token * (sc.prompt_tokens + sc.output_tokens)) < sc.max_num_seqs


@pytest.mark.parametrize("peak,ramp", [(4, 1.0), (12, 1.0), (16, 1.0), (20, 1.0), (20, 2.0), (7.5, 0.5)])
def test_apart_stagger_keeps_the_humps_apart_at_every_peak(peak, ramp):
    """The default stagger of bench/multimodel.py: sampled every 10 ms, no two models ever have load at once (a
    fixed 24 s does at a peak of 16), and the next model's load starts within 1 / ramp seconds of the last one's
    end (the time its rate would take from the floor to 0)."""
    from vkv.demo import Scenario, apart_stagger_s

    sc = Scenario(peaks=(peak,) * 3, ramp=ramp, stagger_s=apart_stagger_s(peak, ramp))
    times = [i / 100 for i in range(int(sc.end(2) * 100) + 100)]
    busy = [[t for t in times if sc.rate(m, t) > 0] for m in range(3)]
    assert all(not (set(busy[m]) & set(busy[m + 1])) for m in range(2))
    assert all(0 < busy[m + 1][0] - busy[m][-1] <= 1.0 / ramp + 0.05 for m in range(2))
    overlapping = Scenario(peaks=(16.0,) * 3, stagger_s=24.0)
    assert any(overlapping.rate(0, i / 100) > 0 and overlapping.rate(1, i / 100) > 0 for i in range(4000))


def test_gpu_kv_budget_is_what_the_weights_leave_and_refuses_a_gpu_too_small():
    """The KV budget of the GPU scenario: the GPU's bytes less three 8B models' weights and the working memory, in
    whole pages a share; a GPU whose weights leave nothing is refused with the sizes named (vkv demo prints it)."""
    import torch

    from vkv.allocator import InvalidRequestError
    from vkv.demo import WEIGHTS_8B, WORK_BYTES, gpu_kv_budget, gpu_scenario

    gpu = 80 << 30
    if torch.cuda.is_available():  # the device's memory as cudaMemGetInfo counts it, against the properties' figure
        gpu = min(gpu, torch.cuda.mem_get_info()[1])
    budget = gpu_kv_budget()
    left = gpu - 3 * WEIGHTS_8B - (8 << 30)
    assert budget % (3 * (2 << 20)) == 0 and left - 3 * (2 << 20) < budget <= left
    with pytest.raises(InvalidRequestError, match="leaves no KV memory beside 3 x 16 GB of weights"):
        gpu_kv_budget(40 << 30)
    # one server a model: each keeps its own working memory, three times one process's
    assert gpu_scenario("processes").kv_budget_bytes == gpu_kv_budget(work_bytes=3 * WORK_BYTES) < budget
    assert gpu_scenario("processes").mode == "processes" and gpu_scenario().kv_budget_bytes == budget


def test_gpu_used_bytes_reads_the_gpu_or_says_none(monkeypatch):
    """nvidia-smi's memory in use of the GPU the servers see, in bytes, at most the card's; None with no nvidia-smi
    (a machine without an NVIDIA driver) or with every GPU hidden (``CUDA_VISIBLE_DEVICES=``): the demo then records
    no GPU peak."""
    import asyncio
    import shutil

    from vkv.demo import device_memory_bytes, gpu_used_bytes

    used = asyncio.run(gpu_used_bytes())
    if torch.cuda.is_available():
        total = device_memory_bytes()
        assert total is not None and used is not None and 0 <= used <= total
    elif shutil.which("nvidia-smi") is None:
        assert used is None
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert asyncio.run(gpu_used_bytes()) is None
