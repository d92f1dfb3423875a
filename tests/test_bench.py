# SPDX-License-Identifier: Apache-2.0
"""bench/elastic.py's decode loop (a) runs on the host backend, synchronous and overlapped, in every layout:
the benchmark that measures issue 4's first target must not rot between GPU sessions."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layout", [[], ["--layout", "grouped", "--group-layers", "1"], ["--layout", "layer"]])
def test_elastic_decode_loop_runs_on_the_host(layout):
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the kernels over host memory, even where a GPU is present
    cmd = [sys.executable, str(ROOT / "bench" / "elastic.py"), "--backend", "host", "--quick", "--only-a", *layout]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # the mapper kept ahead of a step of ~0.5 s (the interpreter): no synchronous grow on the step path
    assert re.search(r"\(a\) step .* 0 synchronous grows on the step path", out), out
    overlapped = re.search(r"\(a\) overlapped loops .* median ([0-9.]+)x", out)
    assert overlapped and float(overlapped.group(1)) > 0, out
    for loop in ("on_demand", "premapped", "premapped_interleaved", "on_demand_overlap", "premapped_overlap"):
        assert f"(a) {loop}: median us per phase" in out, out
    # the pre-mapped loops map nothing while they run
    mapped = dict(re.findall(r"\(a\) (\w+): .*pages mapped during a step \{'mean': ([0-9.e-]+)", out))
    assert float(mapped["premapped"]) == 0 and float(mapped["premapped_overlap"]) == 0, out


def test_elastic_refuses_group_layers_without_the_grouped_layout():
    cmd = [sys.executable, str(ROOT / "bench" / "elastic.py"), "--backend", "host", "--only-a", "--group-layers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--group-layers goes with --layout grouped" in done.stderr
