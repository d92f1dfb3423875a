# SPDX-License-Identifier: Apache-2.0
"""The README's examples run as written (each in a fresh interpreter, as a user would paste them, outside the
repository: its root must not be on sys.path, where kernels/ would shadow the PyPI package transformers probes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)[0]


def test_the_transformers_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, "-c", _block("Use with transformers")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("torch.Size([2, 28])") and "VkvCache(sequences=2" in out.stdout, out.stdout


def test_the_engine_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, "-c", _block("Serve")], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("length [") for line in lines), out.stdout
