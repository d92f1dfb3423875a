# SPDX-License-Identifier: Apache-2.0
"""Several processes on one ledger under SIGKILL and SIGSTOP: does the budget hold, does data survive, is memory lost?

    python bench/stress.py [--backend host|cuda] [--processes 8] [--seconds 60] [--seed 0] [--budget 256MiB]
                           [--page-size 2MiB] [--lock-timeout 0.5] [--out PATH]

Members (bench/stress_worker.py) do random allocate / grow / free / share_prefix / trim / read on a KVCache over
a PagePool on ONE ledger (a temporary file, or one in $VKV_LEDGER_DIR), checking every token they read. The
supervisor SIGKILLs (and restarts) and SIGSTOPs / SIGCONTs random members, some caught holding the ledger's lock.
A watcher samples every ~10 ms the memory really alive (host: the allocated bytes of the members' memfds; cuda:
each member's bytes in NVML less its own context, which it measures when it says "ready" holding no page; where
NVML gives no per-process figure, cuMemGetInfo's used bytes less an average context) and the ledger, the memory
read while the watcher holds the ledger's lock (Ledger.audit: no page is counted in meanwhile). Writes
bench/results/stress-<backend>.json and prints a table; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    RESULTS,
    AliveMemory,
    environment,
    excess_by_member,
    last_unclaims,
    late_frees,
    print_stress_report,
    write_json,
)

from vkv import Ledger
from vkv.allocator.ledger import LedgerBusyError
from vkv.cli import parse_size

WORKER = Path(__file__).resolve().parent / "stress_worker.py"
KILL_RATE, STOP_RATE = 0.5, 0.7  # per second, over all members
TICK_S, SAMPLE_S, REAP_TARGET_S, DELAY_SLACK_S, OVER_KEPT = 0.05, 0.01, 1.0, 0.25, 40  # OVER_KEPT: samples explained


@dataclass(slots=True)
class Member:
    index: int
    incarnation: int
    proc: subprocess.Popen
    log: Path
    resumed: float  # started, or last SIGCONT
    killed: bool = False
    stopped_at: float | None = None
    resume_at: float = 0.0
    holding: bool = False  # stopped while holding the ledger's lock
    stops: list[tuple[float, float, bool]] = field(default_factory=list)  # (SIGSTOP, SIGCONT, holding)
    said_ready: bool = False  # its log's first line is there: "ready"
    context: int | None = None  # cuda: the bytes NVML counted for it when it said ready (holding no page)

    def events(self) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.endswith("}")]  # a killed member's last line may be cut

    def ready(self) -> bool:
        if not self.said_ready:
            with contextlib.suppress(OSError), open(self.log) as f:
                if (line := f.readline()).endswith("}\n"):
                    self.context, self.said_ready = json.loads(line).get("context_bytes"), True
        return self.said_ready


class Watcher(AliveMemory, threading.Thread):
    """Samples alive memory and the ledger every SAMPLE_S until stopped; notes when killed members' entries go."""

    def __init__(self, ledger: Ledger, budget: int, page_size: int, backend: str, members: list[Member]):
        threading.Thread.__init__(self, daemon=True)
        self.ledger, self.budget, self.page_size = ledger, budget, page_size
        AliveMemory.__init__(self, backend, members)
        self.halt = threading.Event()
        self.samples = self.over_budget = self.busy = self.max_alive = self.max_counted = self.unsettled = 0
        self.killed: dict[int, float] = {}  # pid -> SIGKILL time, until its entry is gone
        self.reaped: list[tuple[float, float]] = []  # (SIGKILL, entry seen gone)
        self.gap = [None, None]  # the least and most alive - counted bytes of a sample with both halves
        self.over_samples: list[dict] = []  # the first OVER_KEPT samples over budget, each member's share

    def sample(self) -> None:
        try:  # alive read under the ledger's lock: no page is counted in meanwhile, so alive <= counted must hold
            stats, alive = self.ledger.audit(self.alive)
        except LedgerBusyError:  # a stopped member holds the lock: the sample has no ledger half
            stats, alive = None, self.alive()
        now = time.monotonic()
        with self.lock:
            self.samples, self.busy = self.samples + 1, self.busy + (stats is None)
            self.unsettled += alive is None
            self.max_alive, over = max(self.max_alive, alive or 0), (alive or 0) > self.budget
            if stats is not None:
                counted = stats.pages_mapped
                if alive is not None:
                    gap, (lo, hi) = alive - counted * self.page_size, self.gap
                    self.gap = [gap if lo is None else min(lo, gap), gap if hi is None else max(hi, gap)]
                self.max_counted = max(self.max_counted, counted)
                over = over or counted > stats.budget_pages or stats.budget_pages * self.page_size != self.budget
                live = {e.pid for e in stats.entries}
                for pid in [pid for pid, t in self.killed.items() if pid not in live]:
                    self.reaped.append((self.killed.pop(pid), now))
            self.over_budget += over
            rows = excess_by_member(self, stats, now) if stats is not None else []  # every sample: the history
            if over and self.over_budget <= OVER_KEPT:  # explained: its figures, the members with most excess
                kills = [*self.killed.values(), *(k for k, _ in self.reaped)]
                self.over_samples.append({
                    "alive_mib": (alive or 0) / 2**20, "counted_pages": stats and counted,
                    "since_last_kill_s": kills and now - max(kills), "members": rows, "t": now,
                })  # fmt: skip

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_S):
            self.sample()


class Supervisor:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir, self.rng = args, workdir, random.Random(args.seed)
        folder = os.environ.get("VKV_LEDGER_DIR") or str(workdir)
        self.ledger_path = os.path.join(folder, f"ledger-stress-{os.getpid()}")
        self.ledger = Ledger.open(path=self.ledger_path, budget_bytes=args.budget, page_size=args.page_size,
                                  lock_timeout_s=0.05)  # fmt: skip
        st = os.stat(self.ledger_path)
        self.ledger_lock = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        self.go = workdir / "go"
        self.members, self.gone = [], []  # the current incarnation of each index; earlier ones
        self.incarnations = self.kills = self.stop_count = self.lock_stops = 0
        self.crashes, self.hangs = [], []
        self.watcher = Watcher(self.ledger, args.budget, args.page_size, args.backend, self.members)

    def start(self, index: int) -> Member:
        self.incarnations += 1
        log = self.workdir / f"member-{index}-{self.incarnations}.jsonl"
        a = self.args
        cmd = [
            sys.executable, str(WORKER), "--ledger", self.ledger_path, "--log", str(log), "--index", str(index),
            "--incarnation", str(self.incarnations), "--parent", str(os.getpid()), "--go", str(self.go),
            "--backend", a.backend, "--page-size", str(a.page_size), "--budget", str(a.budget),
            "--seed", str(a.seed), "--lock-timeout", str(a.lock_timeout), "--grow-timeout", str(a.lock_timeout / 2),
            "--max-seconds", str(a.seconds + 60),
        ]  # fmt: skip
        with open(log.with_suffix(".err"), "w") as stderr:  # the child keeps its own copy
            env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # cuda: used = contexts + KV pages alone
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        return Member(index, self.incarnations, proc, log, time.monotonic())

    def crash(self, m: Member, why: str) -> None:
        tail = m.log.with_suffix(".err").read_text()[-600:].strip().replace("\n", " | ")
        self.crashes.append(f"member {m.index}.{m.incarnation} (pid {m.proc.pid}) {why}: {tail}")

    def kill(self, m: Member) -> None:
        t = time.monotonic()
        m.killed = True
        m.proc.kill()
        m.proc.wait()
        self.watcher.bury(m)
        if m.stopped_at is not None:
            m.stops.append((m.stopped_at, t, m.holding))
        with self.watcher.lock:
            self.watcher.killed[m.proc.pid], self.watcher.settled_at = t, t + 1.0
        self.kills += 1
        self.gone.append(m)
        self.members[m.index] = self.start(m.index)

    def tick(self, now: float, chaos: bool = True) -> None:
        for m in list(self.members):
            if m.proc.poll() is not None:
                self.watcher.bury(m)
                self.crash(m, f"exited with {m.proc.returncode}")
                self.gone.append(m)
                self.members[m.index] = self.start(m.index)
            elif m.stopped_at is not None and now >= m.resume_at:
                m.proc.send_signal(signal.SIGCONT)
                m.stops.append((m.stopped_at, now, m.holding))
                m.stopped_at, m.resumed = None, now
            elif m.stopped_at is None and m.ready():
                quiet_s = now - max(m.log.stat().st_mtime - time.time() + now, m.resumed)
                if quiet_s > max(5.0, 4 * self.args.lock_timeout):
                    self.hangs.append(f"member {m.index}.{m.incarnation} silent for {quiet_s:.1f} s")
                    self.kill(m)
        ready = [m for m in self.members if m.ready() and m.proc.returncode is None]
        if not chaos:
            return
        if ready and self.rng.random() < KILL_RATE * TICK_S:
            self.kill(self.rng.choice(ready))
        running = [m for m in ready if m.stopped_at is None and not m.killed]
        stopped = len(self.members) - len([m for m in self.members if m.stopped_at is None])
        if running and stopped < max(1, len(self.members) // 4) and self.rng.random() < STOP_RATE * TICK_S:
            m = self.rng.choice(running)
            m.holding = self.freeze(m, catch_lock=not self.lock_stops or self.rng.random() < 0.5)
            m.stopped_at, m.resume_at = now, now + self.rng.uniform(0.1, 2 * self.args.lock_timeout)
            self.stop_count += 1
            self.lock_stops += m.holding

    def freeze(self, m: Member, catch_lock: bool) -> bool:
        """SIGSTOP ``m`` (to catch it holding the ledger's lock: SIGCONT and again, 200 tries); True if it holds it."""
        for attempt in range(200 if catch_lock else 1):
            if attempt:
                m.proc.send_signal(signal.SIGCONT)
                time.sleep(0.001)
            m.proc.send_signal(signal.SIGSTOP)
            for _ in range(200):  # the signal is delivered asynchronously: wait for the stopped state
                with open(f"/proc/{m.proc.pid}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] in "tT":
                        break
                time.sleep(0.0005)
            with open("/proc/locks") as f:  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->"
                if any(line.split()[4:6] == [str(m.proc.pid), self.ledger_lock] for line in f if "->" not in line):
                    return True
        return False

    def wait_for(self, what, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not (done := what()) and time.monotonic() < end:
            time.sleep(0.02)
        return done

    def run(self) -> dict:
        a = self.args
        self.members.extend(self.start(i) for i in range(a.processes))
        if not self.wait_for(lambda: all(m.ready() for m in self.members), 120):
            raise RuntimeError("the members did not start within 120 s")
        if a.backend == "cuda":  # the members' contexts are not KV pages
            self.watcher.choose(self.members)
        self.watcher.start()
        self.go.touch()
        start = time.monotonic()
        while (now := time.monotonic()) < start + a.seconds:
            self.tick(now)
            time.sleep(TICK_S)
        for m in self.members:
            m.resume_at = 0.0
        self.tick(time.monotonic(), chaos=False)  # SIGCONT every stopped member
        self.wait_for(lambda: all(m.ready() for m in self.members), 60)
        for m in self.members:
            m.proc.send_signal(signal.SIGUSR1)
        quiet = self.wait_for(lambda: all(any(e["ev"] == "quiet" for e in m.events()) for m in self.members), 30)
        self.wait_for(lambda: self.watcher.alive() is not None, 5.2)
        alive_quiet, counted_quiet = self.watcher.alive() or 0, self.counted()
        for m in self.members:
            m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            if not self.wait_for(lambda m=m: m.proc.poll() is not None, 30):
                self.hangs.append(f"member {m.index}.{m.incarnation} did not exit within 30 s of SIGTERM")
                m.killed = True
            elif m.proc.returncode != 0:
                self.crash(m, f"exited with {m.proc.returncode} after SIGTERM")
            self.watcher.bury(m)
        self.kill_all()  # the hung ones
        self.watcher.join(5)
        self.wait_for(lambda: self.watcher.alive() == 0, 5)  # cuda: dead contexts go a little after their processes
        self.watcher.sample()
        if not quiet:
            self.hangs.append("not every member settled within 30 s of SIGUSR1")
        return self.report(alive_quiet - counted_quiet * a.page_size, self.watcher.alive() or 0, self.counted(), start)

    def counted(self) -> int:
        for _ in range(200):  # bounded: 200 x 50 ms lock timeouts at most
            with contextlib.suppress(LedgerBusyError):
                return self.ledger.stats().pages_mapped
        raise RuntimeError("the ledger stayed locked for 10 s")

    def report(self, lost_quiet: int, alive_end: int, counted_end: int, start: float) -> dict:
        a, w = self.args, self.watcher
        everyone = self.gone + self.members
        ops, refused, errors, checksum, delays, late = Counter(), Counter(), [], 0, [], []
        unclaims: dict[int, list[dict]] = {}  # pid -> its pool's counting out of pages (bench/stress_worker.py)
        stops = {m.proc.pid: m.stops for m in everyone}
        contexts = [m.context for m in everyone if m.context is not None]  # cuda: each incarnation's own
        for m in everyone:
            events = m.events()
            last = next((e for e in reversed(events) if e["ev"] in ("done", "quiet", "counts")), {})
            ops.update(last.get("ops", {}))
            refused.update(last.get("refused", {}))
            errors += [f"{m.index}.{m.incarnation} {e['kind']}: {e['error']}" for e in events if e["ev"] == "error"]
            checksum += sum(e["ev"] == "checksum" for e in events)
            late += [e for e in events if e["ev"] == "late_free"]
            unclaims[m.proc.pid] = [e for e in events if e["ev"] == "unclaim"]
            for e in (e for e in events if e["ev"] == "slow"):
                t0, t1 = e["t0"], e["t0"] + e["dur"]
                own = any(s < t1 and t0 < c for s, c, _ in stops[m.proc.pid])
                others = [h for pid, ss in stops.items() if pid != m.proc.pid for s, c, h in ss if s < t1 and t0 < c]
                if others and not own:  # an op of several ledger calls can meet two lock holders stopped in turn,
                    delays.append(e["dur"] / max(1, sum(others)))  # and wait for each: the bound is a stop's
        # A kill while another member is stopped holding the ledger's lock is reaped once that stop ends.
        held = [(s, c) for ss in stops.values() for s, c, holding in ss if holding]
        blocked = {k: any(s < seen and k < c for s, c in held) for k, seen in w.reaped}
        reap = sorted(seen - k for k, seen in w.reaped if not blocked[k])
        reap_blocked = max((seen - k for k, seen in w.reaped if blocked[k]), default=None)
        result = {
            "environment": environment(),
            "config": {k: getattr(a, k) for k in ("backend", "processes", "seconds", "seed", "budget", "page_size")}
            | {"lock_timeout_s": a.lock_timeout, "grow_timeout_s": a.lock_timeout / 2, "ledger": self.ledger_path},
            "seconds_run": time.monotonic() - start,
            "operations": dict(ops), "operations_total": sum(ops.values()), "refused": dict(refused),
            "unexpected_errors": len(errors), "error_examples": errors[:10], "checksum_failures": checksum,
            "samples": w.samples, "samples_ledger_busy": w.busy, "samples_over_budget": w.over_budget,
            "samples_no_alive_half": w.unsettled, "over_budget_breakdown": w.over_samples,
            "over_budget_after": last_unclaims(w.over_samples, unclaims),
            "max_alive_bytes": w.max_alive, "max_counted_bytes": w.max_counted * a.page_size, "budget_bytes": a.budget,
            "lost_bytes_quiesced": lost_quiet, "lost_bytes_end": alive_end - counted_end * a.page_size,
            "alive_method": w.method, "alive_method_why": w.why,
            "alive_minus_counted_bytes_min": w.gap[0], "alive_minus_counted_bytes_max": w.gap[1],
            "contexts_measured": len(contexts), "context_bytes_min": min(contexts, default=None),
            "context_bytes_max": max(contexts, default=None), "context_bytes_average_device_wide": w.context_bytes,
            "kills": self.kills, "kills_not_reaped": len(w.killed),
            "reap_s_max": reap[-1] if reap else None, "reap_s_median": statistics.median(reap) if reap else None,
            "reap_s_max_behind_stopped_lock_holder": reap_blocked,
            "stops": self.stop_count, "stops_holding_lock": self.lock_stops,
            "stop_delay_s_max": max(delays, default=0.0), "stop_delayed_ops": len(delays),
            "crashes": self.crashes, "hangs": self.hangs, **late_frees(late),
        }  # fmt: skip
        result["targets_met"] = {
            "no_checksum_failure": checksum == 0, "no_unexpected_error": not errors,
            "no_sample_over_budget": w.over_budget == 0,
            "no_bytes_lost": lost_quiet == 0 and result["lost_bytes_end"] == 0,
            "reaped_within_1s": not w.killed and (not reap or reap[-1] < REAP_TARGET_S),
            "stop_delay_within_lock_timeout": result["stop_delay_s_max"] <= a.lock_timeout + DELAY_SLACK_S,
            "no_crash_or_hang": not self.crashes and not self.hangs,
        }  # fmt: skip
        return result

    def kill_all(self) -> None:
        """Kill every member still there (also on error: no orphans)."""
        for m in self.gone + self.members:
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
        self.watcher.halt.set()

    def close(self) -> None:
        self.kill_all()
        self.ledger.close()
        if os.path.exists(self.ledger_path):  # in $VKV_LEDGER_DIR it would outlive the temporary directory
            os.unlink(self.ledger_path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("host", "cuda"), default="host")
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=parse_size, default=256 << 20, help="the ledger's budget, e.g. 256MiB")
    p.add_argument("--page-size", type=parse_size, default=2 << 20)
    p.add_argument("--lock-timeout", type=float, default=0.5, help="each member's Ledger lock_timeout_s")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/stress-<backend>.json)")
    args = p.parse_args(argv)
    if args.processes < 1 or args.seconds <= 0 or args.budget % args.page_size or args.budget <= 0:
        p.error("--processes >= 1, --seconds > 0 and a positive --budget that is a multiple of --page-size")
    with tempfile.TemporaryDirectory(prefix="vkv-stress-") as tmp:
        sup = Supervisor(args, Path(tmp))
        try:
            result = sup.run()
        finally:
            sup.close()
    out = args.out or RESULTS / f"stress-{args.backend}.json"
    write_json(out.stem, result, out.parent)
    print_stress_report(result, REAP_TARGET_S)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if all(main()["targets_met"].values()) else 1)
