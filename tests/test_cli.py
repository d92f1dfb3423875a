# SPDX-License-Identifier: Apache-2.0
import json
import subprocess
import sys


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
