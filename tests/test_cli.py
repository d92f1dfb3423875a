# SPDX-License-Identifier: Apache-2.0
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from vkv.allocator.ledger import Ledger
from vkv.cli import main, parse_size


def _vkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vkv.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_reports_backend_page_size_and_pool(backend):
    done = _vkv("info", "--backend", backend, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["backend"] == backend and report["page_size"] == 2 << 20 and report["probe_pages_ok"]
    pool = report["pool"]
    assert (pool["created"], pool["reused"], pool["in_use"], pool["free"]) == (2, 1, 1, 1)
    table = _vkv("info", "--backend", backend)
    assert table.returncode == 0 and "page size  2048 KiB" in table.stdout


def test_info_refuses_an_unknown_backend():
    done = _vkv("info", "--backend", "tpu")
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr


PAGE = 2 << 20


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.open(budget_bytes=24 * PAGE, page_size=PAGE, path=tmp_path / "ledger")
    yield ledger
    ledger.close()


@pytest.mark.parametrize(
    "text, size",
    [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("4096", 4096), ("2 MB", 2_000_000),
     ("1k", 1024), ("none", None)],
)  # fmt: skip
def test_sizes_parse(text, size):
    assert parse_size(text) == size


def test_top_shows_every_model_with_rates(ledger):
    llama = ledger.register("llama-8b", priority=2, min_bytes=2 * PAGE, limit_bytes=16 * PAGE)
    qwen = ledger.register("qwen-0.5b")
    ledger.grow(llama, 10)
    ledger.set_in_use(llama, 7)
    ledger.grow(qwen, 3)
    stop = threading.Event()

    def churn():  # qwen maps and unmaps a page every few ms while top measures
        while not stop.wait(0.002):
            ledger.grow(qwen, 1)
            ledger.shrink(qwen, 1)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        done = _vkv("top", "--once", "--interval", "0.2", "--path", ledger.path)
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    head, columns, first, second = done.stdout.splitlines()
    assert "budget 24 (48 MiB)  mapped 13 (26 MiB) 54%  in use 7 (14 MiB)  models 2" in head
    assert columns.split() == ["MODEL", "PID", "MAPPED", "IN", "USE", "LIMIT", "PRIO/MIN", "MAP/s", "UNMAP/s", "ASKED"]
    pid = str(os.getpid())
    assert first.split() == ["llama-8b", pid, "10", "(20", "MiB)", "7", "(14", "MiB)", "16", "(32", "MiB)", "2/2",
                             "0.0", "0.0", "0"]  # fmt: skip
    name, qpid, mapped, *_, prio, up, down, asked = second.split()
    assert (name, qpid, prio, asked) == ("qwen-0.5b", pid, "0/0", "0") and mapped in ("3", "4")
    assert 10 < float(up) < 600 and 10 < float(down) < 600  # pages/s


def test_top_refreshes_until_interrupted(ledger):
    ledger.register("m")
    top = subprocess.Popen(
        [sys.executable, "-m", "vkv.cli", "top", "--interval", "0.05", "--path", ledger.path],
        stdout=subprocess.PIPE,
        text=True,
    )
    frames = 0
    for line in top.stdout:
        frames += line.startswith("\x1b[H\x1b[2J")
        if frames == 3:
            break
    top.send_signal(signal.SIGINT)
    assert top.wait(timeout=30) == 0 and frames == 3


def test_limit_changes_a_running_model(ledger):
    m = ledger.register("m")
    ledger.grow(m, 6)
    done = _vkv("limit", "m", "8MiB", "--path", ledger.path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "limit of 'm' set to 4 pages (8 MiB); it has 6 pages mapped; asked to give back 2\n"
    assert ledger.entry(m).limit_pages == 4 and not ledger.try_grow(m, 1)
    assert main(["limit", "m", "none", "--path", ledger.path]) == 0 and ledger.try_grow(m, 1)


@pytest.mark.parametrize(
    "args, error",
    [
        (["limit", "m", "8 furlongs"], "vkv limit: bad size '8 furlongs': expected a number of bytes or a size like"),
        (["limit", "m", "1KiB"], "vkv: a limit must be at least one page (2 MiB), got 1024 bytes"),
        (["limit", "nobody", "1GiB"], "vkv: no model named 'nobody' in the ledger at {path}; live models: 'm'"),
        (["top", "--once", "--path", "{path}-missing"], "vkv: no ledger at {path}-missing: no vkv process has"),
    ],
)
def test_limit_and_top_errors_exit_1(ledger, capsys, args, error):
    ledger.register("m")
    assert main([a.format(path=ledger.path) for a in args] + ["--path", ledger.path] * ("--path" not in args)) == 1
    assert capsys.readouterr().err.startswith(error.format(path=ledger.path))


@pytest.mark.parametrize(
    "args, error", [(["limit", "m"], "required: size"), (["top", "--interval", "0"], "must be > 0 seconds, got 0")]
)
def test_argument_errors_exit_2(capsys, args, error):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and error in capsys.readouterr().err
