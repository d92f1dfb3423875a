# SPDX-License-Identifier: Apache-2.0
"""Several processes on one ledger under SIGKILL and SIGSTOP: does the budget hold, does data survive, is memory lost?

    python bench/stress.py [--backend host|cuda] [--processes 8] [--seconds 60] [--seed 0]
                           [--budget 256MiB] [--page-size 2MiB] [--lock-timeout 0.5] [--out PATH]

Members (bench/stress_worker.py) do random allocate / grow / free / share_prefix / trim / read on a KVCache over
a PagePool on ONE ledger (a temporary file, or one in $VKV_LEDGER_DIR), checking every token they read against
the pattern it was written with. The supervisor SIGKILLs random members (and starts them again) and SIGSTOPs /
SIGCONTs others. A watcher samples every ~10 ms the memory really alive (host: the allocated bytes of the live
members' memfds; cuda: cuMemGetInfo's used bytes less a baseline) and the ledger's counted pages and budget.
Prints a table and writes bench/results/stress-<backend>.json; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
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

from common import RESULTS, environment, print_table

from vkv import Ledger
from vkv.allocator.ledger import LedgerBusyError

WORKER = Path(__file__).resolve().parent / "stress_worker.py"
KILL_RATE, STOP_RATE = 0.5, 0.7  # per second, over all members
TICK_S, SAMPLE_S, REAP_TARGET_S, DELAY_SLACK_S = 0.05, 0.01, 1.0, 0.25


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    return int(float(text.removesuffix(unit)) * units[unit])


@dataclass(slots=True)
class Member:
    index: int
    incarnation: int
    proc: subprocess.Popen
    log: Path
    started: float
    killed: bool = False
    stopped_at: float | None = None
    resume_at: float = 0.0
    resumed: float = 0.0
    stops: list[tuple[float, float]] = field(default_factory=list)  # (SIGSTOP, SIGCONT) monotonic times

    def events(self) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.endswith("}")]

    def ready(self) -> bool:
        return self.log.exists() and self.log.stat().st_size > 0


class Watcher(threading.Thread):
    """Samples alive memory and the ledger every SAMPLE_S until stopped; notes when killed members' entries go."""

    def __init__(self, ledger: Ledger, budget: int, page_size: int, backend: str, pids):
        super().__init__(daemon=True)
        self.ledger, self.budget, self.page_size, self.backend, self.pids = ledger, budget, page_size, backend, pids
        self.halt, self.lock = threading.Event(), threading.Lock()
        self.samples = self.over_budget = self.busy = 0
        self.max_alive = self.max_counted = 0
        self.killed: dict[int, float] = {}  # pid -> SIGKILL time, until its entry is gone
        self.reap_s: list[float] = []
        self.baseline = self.context_bytes = 0  # cuda: used bytes before the members; one member's context
        self._fds: dict[int, str] = {}

    def memfd_bytes(self, pid: int) -> int:
        """Bytes the OS holds for the member's page memfd (released pages are holes: they hold none)."""
        try:
            if pid not in self._fds:
                links = (f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd"))
                self._fds[pid] = next(link for link in links if "memfd:vkv-pages" in os.readlink(link))
            return os.stat(self._fds[pid]).st_blocks * 512
        except (OSError, StopIteration):  # gone meanwhile, or no pool yet
            self._fds.pop(pid, None)
            return 0

    def alive(self) -> int:
        pids = self.pids()
        if self.backend == "host":
            return sum(self.memfd_bytes(pid) for pid in pids)
        import torch

        free, total = torch.cuda.mem_get_info()
        return max(0, total - free - self.baseline - self.context_bytes * len(pids))

    def sample(self) -> None:
        alive = self.alive()
        try:
            stats = self.ledger.stats()
        except LedgerBusyError:  # a stopped member holds the lock: the sample has no ledger half
            stats = None
        now = time.monotonic()
        with self.lock:
            self.samples, self.busy = self.samples + 1, self.busy + (stats is None)
            self.max_alive, over = max(self.max_alive, alive), alive > self.budget
            if stats is not None:
                counted = stats.pages_mapped
                self.max_counted = max(self.max_counted, counted)
                over = over or counted > stats.budget_pages or stats.budget_pages * self.page_size != self.budget
                live = {e.pid for e in stats.entries}
                for pid in [pid for pid, t in self.killed.items() if pid not in live]:
                    self.reap_s.append(now - self.killed.pop(pid))
            self.over_budget += over

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_S):
            self.sample()


class Supervisor:
    def __init__(self, args: argparse.Namespace, workdir: Path, baseline_cuda: int = 0):
        self.args, self.workdir, self.rng = args, workdir, random.Random(args.seed)
        self.baseline_cuda = baseline_cuda  # cuda: used bytes before any member started
        folder = os.environ.get("VKV_LEDGER_DIR") or str(workdir)
        self.ledger_path = os.path.join(folder, f"ledger-stress-{os.getpid()}")
        self.ledger = Ledger.open(
            path=self.ledger_path, budget_bytes=args.budget, page_size=args.page_size, lock_timeout_s=0.05
        )
        self.go = workdir / "go"
        self.members: list[Member] = []  # the current incarnation of each index
        self.gone: list[Member] = []  # earlier incarnations
        self.incarnations = 0
        self.kills = self.stop_count = 0
        self.crashes, self.hangs = [], []
        self.watcher = Watcher(self.ledger, args.budget, args.page_size, args.backend, self.live_pids)

    def live_pids(self) -> list[int]:
        return [m.proc.pid for m in list(self.members) if m.proc.returncode is None]

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
        stderr = open(log.with_suffix(".err"), "w")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        stderr.close()
        return Member(index, self.incarnations, proc, log, time.monotonic())

    def replace(self, m: Member) -> None:
        self.gone.append(m)
        self.members[m.index] = self.start(m.index)

    def crash(self, m: Member, why: str) -> None:
        tail = m.log.with_suffix(".err").read_text()[-600:].strip().replace("\n", " | ")
        self.crashes.append(f"member {m.index}.{m.incarnation} (pid {m.proc.pid}) {why}: {tail}")

    def kill(self, m: Member) -> None:
        t = time.monotonic()
        m.killed = True
        m.proc.kill()
        m.proc.wait()
        if m.stopped_at is not None:
            m.stops.append((m.stopped_at, t))
        with self.watcher.lock:
            self.watcher.killed[m.proc.pid] = t
        self.kills += 1
        self.replace(m)

    def tick(self, now: float, chaos: bool = True) -> None:
        a = self.args
        for m in list(self.members):
            if m.proc.poll() is not None:
                self.crash(m, f"exited with {m.proc.returncode}")
                self.replace(m)
            elif m.stopped_at is not None and now >= m.resume_at:
                m.proc.send_signal(signal.SIGCONT)
                m.stops.append((m.stopped_at, now))
                m.stopped_at, m.resumed = None, now
            elif m.stopped_at is None and m.ready():
                quiet_s = now - max(m.log.stat().st_mtime - time.time() + now, m.resumed, m.started)
                if quiet_s > max(5.0, 4 * a.lock_timeout):
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
            m.proc.send_signal(signal.SIGSTOP)
            m.stopped_at, m.resume_at = now, now + self.rng.uniform(0.1, 2 * a.lock_timeout)
            self.stop_count += 1

    def wait_for(self, what, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while not (done := what()) and time.monotonic() < end:
            time.sleep(0.02)
        return done

    def run(self) -> dict:
        a = self.args
        self.members = [self.start(i) for i in range(a.processes)]
        if not self.wait_for(lambda: all(m.ready() for m in self.members), 120):
            raise RuntimeError("the members did not start within 120 s")
        if a.backend == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            self.watcher.baseline = self.baseline_cuda
            self.watcher.context_bytes = max(0, (total - free - self.baseline_cuda) // a.processes)
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
        time.sleep(0.2)
        alive_quiet, counted_quiet = self.watcher.alive(), self.counted()
        for m in self.members:
            m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            try:
                m.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.hangs.append(f"member {m.index}.{m.incarnation} did not exit within 30 s of SIGTERM")
                m.killed = True
                m.proc.kill()
                m.proc.wait()
            if m.proc.returncode != 0 and not m.killed:
                self.crash(m, f"exited with {m.proc.returncode} after SIGTERM")
        self.watcher.halt.set()
        self.watcher.join(5)
        self.watcher.sample()
        if not quiet:
            self.hangs.append("not every member settled within 30 s of SIGUSR1")
        return self.report(alive_quiet - counted_quiet * a.page_size, self.watcher.alive(), self.counted(), start)

    def counted(self) -> int:
        for _ in range(200):  # bounded: 200 x 50 ms lock timeouts at most
            try:
                return self.ledger.stats().pages_mapped
            except LedgerBusyError:
                continue
        raise RuntimeError("the ledger stayed locked for 10 s")

    def report(self, lost_quiet: int, alive_end: int, counted_end: int, start: float) -> dict:
        a, w = self.args, self.watcher
        everyone = self.gone + self.members
        ops, refused, errors, checksum, delays = Counter(), Counter(), [], 0, []
        stops = {m.proc.pid: m.stops for m in everyone}
        for m in everyone:
            events = m.events()
            last = next((e for e in reversed(events) if e["ev"] in ("done", "quiet", "counts")), {})
            ops.update(last.get("ops", {}))
            refused.update(last.get("refused", {}))
            errors += [f"{m.index}.{m.incarnation} {e['kind']}: {e['error']}" for e in events if e["ev"] == "error"]
            checksum += sum(e["ev"] == "checksum" for e in events)
            for e in (e for e in events if e["ev"] == "slow"):
                t0, t1 = e["t0"], e["t0"] + e["dur"]
                own = any(s < t1 and t0 < c for s, c in stops[m.proc.pid])
                other = any(s < t1 and t0 < c for pid, ss in stops.items() if pid != m.proc.pid for s, c in ss)
                if other and not own:
                    delays.append(e["dur"])
        reap = sorted(w.reap_s)
        unreaped = len(w.killed)
        result = {
            "environment": environment(),
            "config": {k: getattr(a, k) for k in ("backend", "processes", "seconds", "seed", "budget", "page_size")}
            | {"lock_timeout_s": a.lock_timeout, "grow_timeout_s": a.lock_timeout / 2, "ledger": self.ledger_path},
            "seconds_run": time.monotonic() - start,
            "operations": dict(ops), "operations_total": sum(ops.values()), "refused": dict(refused),
            "unexpected_errors": len(errors), "error_examples": errors[:10], "checksum_failures": checksum,
            "samples": w.samples, "samples_ledger_busy": w.busy, "samples_over_budget": w.over_budget,
            "max_alive_bytes": w.max_alive, "max_counted_bytes": w.max_counted * a.page_size, "budget_bytes": a.budget,
            "lost_bytes_quiesced": lost_quiet, "lost_bytes_end": alive_end - counted_end * a.page_size,
            "kills": self.kills, "kills_not_reaped": unreaped,
            "reap_s_max": reap[-1] if reap else None, "reap_s_median": statistics.median(reap) if reap else None,
            "stops": self.stop_count, "stop_delay_s_max": max(delays, default=0.0), "stop_delayed_ops": len(delays),
            "crashes": self.crashes, "hangs": self.hangs,
        }  # fmt: skip
        result["targets_met"] = {
            "no_checksum_failure": checksum == 0,
            "no_unexpected_error": not errors,
            "no_sample_over_budget": w.over_budget == 0,
            "no_bytes_lost": lost_quiet == 0 and result["lost_bytes_end"] == 0,
            "reaped_within_1s": unreaped == 0 and (not reap or reap[-1] < REAP_TARGET_S),
            "stop_delay_within_lock_timeout": result["stop_delay_s_max"] <= a.lock_timeout + DELAY_SLACK_S,
            "no_crash_or_hang": not self.crashes and not self.hangs,
        }
        return result

    def close(self) -> None:
        """Kill every member still there (also on error: no orphans), then drop the ledger."""
        for m in self.gone + self.members:
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
        self.watcher.halt.set()
        self.ledger.close()
        if os.path.exists(self.ledger_path):  # in $VKV_LEDGER_DIR it would outlive the temporary directory
            os.unlink(self.ledger_path)


def print_report(r: dict) -> None:
    lines = [(f"ops {k}", v, "") for k, v in sorted(r["operations"].items())]
    lines += [(f"refused {k}", v, "(normal)") for k, v in sorted(r["refused"].items())]
    lines += [
        ("checksum failures", r["checksum_failures"], "0"),
        ("unexpected errors", r["unexpected_errors"], "0"),
        ("samples (ledger busy)", f"{r['samples']} ({r['samples_ledger_busy']})", ""),
        ("samples over budget", r["samples_over_budget"], "0"),
        ("max alive / counted / budget MiB",
         f"{r['max_alive_bytes'] >> 20} / {r['max_counted_bytes'] >> 20} / {r['budget_bytes'] >> 20}", ""),
        ("bytes lost (quiesced, end)", f"{r['lost_bytes_quiesced']}, {r['lost_bytes_end']}", "0, 0"),
        ("kills; reap s max (median)", f"{r['kills']}; {r['reap_s_max'] or 0:.3f} ({r['reap_s_median'] or 0:.3f})",
         f"< {REAP_TARGET_S}"),
        ("stops; delay they caused s", f"{r['stops']}; {r['stop_delay_s_max']:.3f}",
         f"<= {r['config']['lock_timeout_s']}"),
        ("crashes, hangs", f"{len(r['crashes'])}, {len(r['hangs'])}", "0, 0"),
    ]  # fmt: skip
    rows = [dict(zip(("what", "value", "target"), line, strict=True)) for line in lines]
    print_table(rows, ["what", "value", "target"])
    for line in r["error_examples"] + r["crashes"] + r["hangs"]:
        print("  ", line)
    missed = [k for k, ok in r["targets_met"].items() if not ok]
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")


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
    baseline = 0
    if args.backend == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()  # this process's context is part of the baseline
        baseline = total - free
    with tempfile.TemporaryDirectory(prefix="vkv-stress-") as tmp:
        sup = Supervisor(args, Path(tmp), baseline)
        try:
            result = sup.run()
        finally:
            sup.close()
    out = args.out or RESULTS / f"stress-{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if all(main()["targets_met"].values()) else 1)
