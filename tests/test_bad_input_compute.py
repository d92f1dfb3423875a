# SPDX-License-Identifier: Apache-2.0
"""Bad input at the attention wrapper, the kernel launchers and the CLI (issue 12); see test_bad_input.py.

Kernel launches run in a forked child: a bad input the launcher lets through may make the kernel read out of
bounds, and a crash there must fail one case, not end the session. The CLI must answer a bad argument with
exit code 2 and its usage on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vkv.attention import AttentionWrapper
from vkv.cli import main
from vkv.kernels import (
    decode_attention,
    decode_attention_reference,
    extend_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    store_kv,
)

from .test_bad_input import (
    CONFIG,
    NOT_INTS,
    PAGE,
    SETTINGS,
    TRIED,
    Case,
    InvalidRequestError,
    bad_int_lists,
    bad_ints,
    check_all,
    names_arg,
    not_none,
    outcome,
    pairs,
    report_tried,  # noqa: F401 - the module's count of bad inputs, reported at its end
    shown,
    snapshot,
    time_limit,
    world,
)

pytestmark = pytest.mark.main_thread  # time_limit sets SIGALRM's handler
NAN, INF = math.nan, math.inf
BAD_SCALES = ("x", "1.0", NAN, INF, -1.0, 0, 0.0, True, [1.0], b"1", torch.tensor([1.0, 2.0]))

# -- the attention wrapper -----------------------------------------------------------------------------

Q_HEADS = 4  # over the cache's 2 KV heads


def _wrapper(w, **kw) -> AttentionWrapper:
    return AttentionWrapper(**{"cache": w.cache, "num_q_heads": Q_HEADS, **kw})


def _planned(w) -> AttentionWrapper:
    wrapper = _wrapper(w)
    wrapper.plan([0, 1], [5, 3], [1, 1])  # a decode step of two requests
    return wrapper


def _plan_state(w, wrapper: AttentionWrapper) -> dict:
    return {**snapshot(w), "the wrapper's plan": wrapper._plan}


def _run(w, **kw) -> Any:
    wrapper = _planned(w)
    args = {
        "layer": 1,
        "q": torch.randn(2, Q_HEADS, 16),
        "k": torch.randn(2, 2, 16),
        "v": torch.randn(2, 2, 16),
        "out": None,
        "lse": None,
        **kw,
    }
    return wrapper.run(**args)


def bad_tensors(good: torch.Tensor, *, index: bool = False, device: bool = True) -> tuple:
    """Tensors no launcher may take in ``good``'s place: other dtypes, device (unless ``good`` is the tensor the
    others' device is compared with), rank and strides, and non-tensors."""
    wide = torch.zeros(*good.shape[:-1], 2 * good.shape[-1], dtype=good.dtype)
    out = [
        good.to(torch.float64),
        good.to(torch.int64 if index else torch.int32),
        *([torch.empty_like(good, device="meta")] if device else []),
        good.unsqueeze(0),
        good.flatten() if good.dim() > 1 else good[None, :],
        "x",
        None,
        good.tolist(),
        5,
    ]
    if good.shape[-1] > 1:
        out.append(wide[..., ::2])  # non-unit stride on the last axis
    if index:
        out.append(good.to(torch.float32))
    return tuple(out)


ATTENTION = [
    Case("AttentionWrapper()", "cache", ("x", None, 5), lambda w, v: _wrapper(w, cache=v), "D"),
    Case("AttentionWrapper()", "num_q_heads", (*bad_ints(1), 3), lambda w, v: _wrapper(w, num_q_heads=v), "D"),
    Case("AttentionWrapper()", "sm_scale", BAD_SCALES, lambda w, v: _wrapper(w, sm_scale=v), "D"),
    Case("AttentionWrapper.run", "layer", bad_ints(0, 1), lambda w, v: _run(w, layer=v), "D"),
    Case("AttentionWrapper.run", "q", bad_tensors(torch.randn(2, Q_HEADS, 16)), lambda w, v: _run(w, q=v), "D"),
    Case("AttentionWrapper.run", "k", bad_tensors(torch.randn(2, 2, 16)), lambda w, v: _run(w, k=v), "D"),
    Case("AttentionWrapper.run", "v", bad_tensors(torch.randn(2, 2, 16)), lambda w, v: _run(w, v=v), "D"),
    Case("AttentionWrapper.run", "out", tuple(t for t in bad_tensors(torch.randn(2, Q_HEADS, 16)) if t is not None),
         lambda w, v: _run(w, out=v), "D"),
    Case("AttentionWrapper.run", "lse", (*not_none(bad_tensors(torch.randn(2, Q_HEADS))[:-1]),
                                         torch.zeros(2, Q_HEADS, dtype=torch.float16)), lambda w, v: _run(w, lse=v),
         "D"),
]  # fmt: skip


def _huge(value: Any) -> bool:
    """A list holding a huge length: refused by the capacity check, whose message names the slot instead."""
    return isinstance(value, list) and any(type(v) is int and v > CONFIG.max_seq_len for v in value)


def _plan_values(values: tuple) -> tuple:
    """plan() takes a 1-D integer tensor as a sequence (issue 13): bad tensors are the others."""
    kept = (v for v in values if not (isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point()))
    return (*kept, torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), torch.tensor([True, False]))


PLAN = [  # plan(slots, cached_lens, new_lens) over a planned decode step: a refused plan keeps the old one
    ("slots", _plan_values((*bad_int_lists(0, 3, good=0), [True], [0, 3], [0, 0], []))),
    ("cached_lens", _plan_values((*(v for v in bad_int_lists(0, None, good=5) if not _huge(v)), [5, -1]))),
    ("new_lens", _plan_values((*(v for v in bad_int_lists(1, None, good=1) if not _huge(v)), [1, 0]))),
]


def _plan_call(arg: str, value: Any) -> Any:
    good = {"slots": [0, 1], "cached_lens": [5, 3], "new_lens": [1, 1]}
    if isinstance(value, list):
        good = {k: (v * 2)[: len(value)] if k != "slots" else [0, 1, 2, 3][: len(value)] for k, v in good.items()}
    return {**good, arg: value}


def check_plan(arg: str, value: Any, test: str) -> None:
    TRIED[test] += 1
    with world() as w:
        wrapper = _planned(w)
        problem = outcome(lambda: wrapper.plan(**_plan_call(arg, value)), arg, lambda: _plan_state(w, wrapper))
    assert problem is None, f"[D] AttentionWrapper.plan {arg}={shown(value)}: {problem}"


def check_case(case: Case, value: Any, test: str) -> None:
    TRIED[test] += 1
    with world() as w:
        problem = outcome(lambda: case.call(w, value), case.arg, lambda: snapshot(w))
    assert problem is None, f"[{case.owner}] {case.entry} {case.arg}={shown(value)}: {problem}"


@SETTINGS
@given(data=st.data())
def test_bad_attention_input_is_refused_and_changes_nothing(data):
    case, value = data.draw(st.sampled_from(pairs(ATTENTION)), label="case, bad value")
    check_case(case, value, "test_bad_input_compute:attention")


@SETTINGS
@given(data=st.data())
def test_bad_plan_is_refused_and_keeps_the_plan(data):
    arg, value = data.draw(st.sampled_from([(arg, v) for arg, values in PLAN for v in values]), label="arg, value")
    check_plan(arg, value, "test_bad_input_compute:plan")


@pytest.mark.cpu_kernels
@settings(SETTINGS, max_examples=2)
@given(lens=st.lists(st.integers(0, 100), min_size=2, max_size=2))
def test_good_attention_calls_work(lens):
    with world() as w:
        wrapper = _wrapper(w, sm_scale=np.float64(0.25))
        plan = wrapper.plan([np.int64(0), 1], lens, [1, 1])
        assert plan.seq_lens_host == (lens[0] + 1, lens[1] + 1)
        q, k, v = torch.randn(2, Q_HEADS, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
        out = wrapper.run(1, q, k, v)
        k_view, v_view = w.cache.key_view(1), w.cache.value_view(1)
        assert torch.equal(k_view[0, lens[0]], k[0]) and torch.equal(v_view[1, lens[1]], v[1])
        expected, _ = decode_attention_reference(q, k_view, v_view, plan.slot_ids, plan.seq_lens, 0.25)
        torch.testing.assert_close(out.float(), expected, atol=2e-5, rtol=2e-5)


# -- the kernel launchers, each in a forked child ------------------------------------------------------

CHILD_LIMIT_S = 30


def in_child(fn) -> str | None:
    """``fn()`` (a problem string or None) in a forked child; a crash or a hang is the problem."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, running no atexit or pytest code
        os.close(read)
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive a fork: run torch ops inline
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001
            result = f"the check itself raised {type(e).__name__}: {e}"
        os.write(write, pickle.dumps(result))
        os._exit(0)
    os.close(write)
    chunks, deadline, eof = [], time.monotonic() + CHILD_LIMIT_S, False
    try:
        while not eof and (left := deadline - time.monotonic()) > 0 and select.select([read], [], [], left)[0]:
            chunk = os.read(read, 1 << 16)
            eof = not chunk
            chunks.append(chunk)
    finally:
        os.close(read)
    if not eof:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return f"hung: no answer within {CHILD_LIMIT_S} s"
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"crashed the process: {signal.Signals(os.WTERMSIG(status)).name}"
    return pickle.loads(b"".join(chunks)) if chunks else "the child answered nothing"


def _store_args() -> dict:
    k = torch.randn(2, 1, 16)
    return {
        "k_new": k, "v_new": torch.randn_like(k), "k_cache": torch.zeros(4, 32, 1, 16),
        "v_cache": torch.zeros(4, 32, 1, 16), "slot_ids": torch.tensor([0, 3], dtype=torch.int32),
        "positions": torch.tensor([1, 31], dtype=torch.int32),
    }  # fmt: skip


def _decode_args() -> dict:
    return {
        "q": torch.randn(2, 2, 16), "k_cache": torch.randn(4, 32, 1, 16), "v_cache": torch.randn(4, 32, 1, 16),
        "slot_ids": torch.tensor([0, 3], dtype=torch.int32), "seq_lens": torch.tensor([5, 9], dtype=torch.int32),
    }  # fmt: skip


def _extend_args() -> dict:
    return {
        "q": torch.randn(3, 2, 16), "k_cache": torch.randn(4, 32, 1, 16), "v_cache": torch.randn(4, 32, 1, 16),
        "slot_ids": torch.tensor([0, 3], dtype=torch.int32), "cu_seqlens_q": torch.tensor([0, 1, 3], dtype=torch.int32),
        "seq_lens": torch.tensor([5, 9], dtype=torch.int32),
    }  # fmt: skip


def _paged_args() -> dict:
    return {
        "q": torch.randn(2, 2, 16), "k_pages": torch.randn(8, 16, 1, 16), "v_pages": torch.randn(8, 16, 1, 16),
        "block_table": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        "seq_lens": torch.tensor([5, 20], dtype=torch.int32),
    }  # fmt: skip


LAUNCHERS = {
    "store_kv": (store_kv, _store_args),
    "decode_attention": (decode_attention, _decode_args),
    "extend_attention": (extend_attention, _extend_args),
    "paged_decode_attention": (paged_decode_attention, _paged_args),
}
BAD_SPLITS = (*(v for v in bad_ints(1) if v is not None), torch.tensor(2))
BAD_BOUNDS = tuple(v for v in NOT_INTS if v is not None) + (-1, -(2**63))
LENGTHS = {  # the host-side ints each launcher takes
    "decode_attention": {"num_splits": BAD_SPLITS, "max_len": BAD_BOUNDS, "sm_scale": BAD_SCALES[:-2]},
    "extend_attention": {"max_new_tokens": BAD_BOUNDS, "max_len": BAD_BOUNDS, "sm_scale": BAD_SCALES[:-2]},
    "paged_decode_attention": {"num_splits": BAD_SPLITS, "max_len": BAD_BOUNDS, "sm_scale": BAD_SCALES[:-2]},
}


OUTPUTS = {  # the optional outputs, as their good tensors
    "decode_attention": {"out": torch.zeros(2, 2, 16), "lse": torch.zeros(2, 2)},
    "extend_attention": {"out": torch.zeros(3, 2, 16)},
    "paged_decode_attention": {"out": torch.zeros(2, 2, 16), "lse": torch.zeros(2, 2)},
}


def kernel_pairs() -> list[tuple[str, str, Any]]:
    out = []
    for name, (_, make) in LAUNCHERS.items():
        for arg, good in [*make().items(), *OUTPUTS.get(name, {}).items()]:
            bad = bad_tensors(good, index=good.dtype == torch.int32, device=arg not in ("q", "k_new"))
            if arg == "lse":  # any strides will do for lse
                bad = bad[:-1]
            out += [(name, arg, v) for v in bad if v is not None or arg not in ("out", "lse")]
        out += [(name, arg, bad) for arg, values in LENGTHS.get(name, {}).items() for bad in values]
    return out


KERNEL_PAIRS = kernel_pairs()


def check_kernel(name: str, arg: str, value: Any, test: str) -> None:
    TRIED[test] += 1
    launch, make = LAUNCHERS[name]

    def attempt():
        args = make()
        before = {k: v.clone() for k, v in args.items()}
        args[arg] = value
        return outcome(
            lambda: launch(**args),
            arg,
            lambda: {f"{k} (an input)": v.clone() for k, v in before.items() if k != arg},
        )

    problem = in_child(attempt)
    assert problem is None, f"[D] {name} {arg}={shown(value)}: {problem}"


@pytest.mark.cpu_kernels
@SETTINGS
@given(data=st.data())
def test_bad_kernel_input_is_refused(data):
    name, arg, value = data.draw(st.sampled_from(KERNEL_PAIRS), label="launcher, argument, bad value")
    check_kernel(name, arg, value, "test_bad_input_compute:kernels")


@pytest.mark.cpu_kernels
def test_every_listed_bad_value_is_refused():
    """Each listed bad input once, deterministically: the complete list of what is still wrong."""
    test = "test_bad_input_compute:all"
    check_all(
        [(check_case, (case, value, test)) for case, value in pairs(ATTENTION)]
        + [(check_plan, (arg, value, test)) for arg, values in PLAN for value in values]
        + [(check_kernel, (name, arg, value, test)) for name, arg, value in KERNEL_PAIRS]
    )


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("bad", [8, -5, 2**31 - 1], ids=["one-past-the-end", "negative", "huge"])
@pytest.mark.parametrize("bound", ["num_splits", "max_len"])
def test_paged_decode_never_reads_outside_the_pages(bad, bound):
    """Issue 12 defect 6: with num_splits or max_seq_len given, a block id outside k_pages is refused or reads
    nothing (its request's row is NaN); the other request's row is still right."""
    TRIED["test_bad_input_compute:kernels"] += 1

    def attempt():
        args = _paged_args()
        args["block_table"][1, 1] = bad
        try:
            out = paged_decode_attention(**args, **{bound: 1 if bound == "num_splits" else 32})
        except (InvalidRequestError, TypeError) as e:
            return None if names_arg(str(e), "block_table") else f"refused without naming block_table: {e}"
        good = {**args, "block_table": args["block_table"][:1], "seq_lens": args["seq_lens"][:1], "q": args["q"][:1]}
        expected, _ = paged_decode_attention_reference(**good)
        if not torch.isnan(out[1]).all():
            return f"accepted block id {bad}: row 1 is {out[1].flatten()[:4].tolist()}..., expected NaN (reads nothing)"
        if not torch.allclose(out[0].float(), expected[0], atol=2e-5, rtol=2e-5):
            return "the request with good block ids got a wrong row"
        return None

    problem = in_child(attempt)
    assert problem is None, f"[D] paged_decode_attention block_table[1, 1]={bad} with {bound}: {problem}"


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_good_kernel_calls_work(name):
    """The same tensors the bad cases start from are accepted, and store_kv writes where it was told."""
    launch, make = LAUNCHERS[name]

    def attempt():
        args = make()
        result = launch(**args)
        if name == "store_kv":
            ok = torch.equal(args["k_cache"][3, 31], args["k_new"][1]) and torch.equal(
                args["v_cache"][0, 1], args["v_new"][0]
            )
            return None if ok else "store_kv did not write the tokens"
        return None if torch.isfinite(result).all() else "a non-finite output from good input"

    assert in_child(attempt) is None


# -- the CLI ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cli_ledger():
    """The test world: its ledger has two live models, ``model`` (the pool's) and ``other``."""
    with world() as w:
        yield w, w.ledger.path


BAD_SIZES = ("abc", "-5", "1.5.5", "inf", "nan", "99999999999999999999T", "", "0x10", "1e3", "5 XB", "0", "1")
BAD_ARGV = [
    ["top", "--interval", v] for v in ("x", "0", "-1", "inf", "nan", "1e400", "")
] + [["limit", "model", v] for v in BAD_SIZES] + [
    ["info", "--backend", "x"], ["info", "--json", "extra"], ["top", "--device"], ["limit", "model"], ["limit"],
    ["frobnicate"], [], ["top", "--once", "--interval"], ["limit", "model", "1MiB", "--path"],
]  # fmt: skip


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def cli_problem(code: Any, err: str) -> str | None:
    if "Traceback" in err:
        return f"a traceback: {err.strip().splitlines()[-1]}"
    if code != 2 or "usage:" not in err:
        return f"exit {code!r}, stderr {err.strip()[-160:]!r}; expected exit 2 and the usage"
    return None


def with_path(argv: list[str], path: str) -> list[str]:
    return [*argv, "--path", path] if argv and argv[0] in ("top", "limit") and "--path" not in argv else argv


@SETTINGS
@given(argv=st.sampled_from(BAD_ARGV))
def test_bad_cli_arguments_exit_2_with_usage(argv):
    TRIED["test_bad_input_compute:cli"] += 1
    with cli_ledger() as (w, path):
        before = snapshot(w)
        try:
            with time_limit(20):
                code, err = run_cli(with_path(argv, path))
        except BaseException as e:  # noqa: BLE001 - the finding
            code, err = None, f"Traceback: raised {type(e).__name__}: {e}"
        problem = cli_problem(code, err) or ("changed the ledger" if snapshot(w) != before else None)
    assert problem is None, f"[D] vkv {' '.join(argv)}: {problem}"


@pytest.mark.parametrize(
    "argv", [["info", "--backend", "x"], ["top", "--interval", "inf"], ["limit", "model", "99999999999999999999T"]]
)
def test_bad_cli_arguments_in_a_subprocess(argv):
    TRIED["test_bad_input_compute:cli"] += 1
    with cli_ledger() as (_, path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        cmd = [sys.executable, "-m", "vkv.cli", *with_path(argv, path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert cli_problem(done.returncode, done.stderr) is None, f"[D] vkv {' '.join(argv)}: {done.stderr[-300:]}"


def test_good_cli_arguments_work():
    with cli_ledger() as (w, path):
        assert run_cli(["limit", "model", "1MiB", "--path", path])[0] == 0
        assert w.ledger.entry(w.entry).limit_pages == (1 << 20) // PAGE
        assert run_cli(["limit", "model", "none", "--path", path])[0] == 0
        assert w.ledger.entry(w.entry).limit_pages == 0
        assert run_cli(["top", "--once", "--interval", "0.01", "--path", path])[0] == 0
    assert run_cli(["info", "--backend", "host", "--json"])[0] == 0


def test_cases_cover_the_compute_entry_points():
    assert {c.entry for c in ATTENTION} == {"AttentionWrapper()", "AttentionWrapper.run"} and PLAN
    assert {name for name, _, _ in KERNEL_PAIRS} == set(LAUNCHERS)
    assert {argv[0] for argv in BAD_ARGV if argv} == {"info", "top", "limit", "frobnicate"}
    assert CONFIG.num_kv_heads * 2 == Q_HEADS
