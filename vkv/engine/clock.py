# SPDX-License-Identifier: Apache-2.0
"""Where an engine's step time goes, summed over its steps (``Engine.stats()``; bench/serve.py divides by steps)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

RING = 8  # event pairs of forwards not yet read: steps that sample nothing do not wait for theirs
KIND_SUMS = ("steps", "wall_s", "wall_max_s", "forward_gpu_s", "forward_timed")  # stats() names them {kind}_{sum}
KINDS = ("decode", "mixed")  # a step of one new token a request (a decode step: a CUDA graph where captured), or not


@dataclass(slots=True)
class StepRecord:
    """One step as ``StepClock.trace`` keeps it (a step that ran a batch, failed or not)."""

    started: float  # time.perf_counter() at the step's start
    wall_s: float
    cpu_s: float
    kind: str | None  # one of KINDS; None: the step failed
    tokens: int  # the batch's tokens (prefill chunks and decode tokens)
    sequences: int  # the requests in it
    forward_gpu_s: float | None = None  # the forward's span on the GPU, once read (None: not read, or no GPU)


class StepClock:
    """The stepping thread's wall and CPU time in ``Engine.step()`` (``step_calls``: every call, a batch or not), and
    on a GPU the forward's span on the device: CUDA events around the launch of each step's forward, read at a later
    launch once they have completed (a step that samples nothing does not wait for its forward, so its pair may stay
    pending a few steps; past RING pending pairs the oldest is dropped and counted).

    Read together, per step: wall far above CPU + the forward's span means the thread waited (for the GIL, or the
    OS); a forward's span longer than in an offline run means its launches were held up (eager launches are Python)
    or the GPU ran other work meanwhile.

    The same sums by kind of step (``step_kind``: "decode" or "mixed", a step that also prefills), with each kind's
    longest wall: an inter-token tail from the steps that prefill shows as mixed steps far longer than decode ones.

    ``trace``: set it to a list and each step that runs a batch appends its StepRecord (bench/serve.py reads where an
    inter-token tail comes from); None (the default) keeps the sums alone."""

    def __init__(self, device: torch.device):
        self.wall_s = self.cpu_s = self.forward_gpu_s = 0.0
        self.step_calls = self.forward_timed = self.forward_dropped = 0
        self.device = device
        self._cuda = device.type == "cuda"
        self.kinds: dict[str, list[float]] = {kind: [0, 0.0, 0.0, 0.0, 0] for kind in KINDS}
        # launched, not read: the event pair, the step's kind, and a box its trace record goes in (None: no trace)
        self._pending: deque[tuple[tuple[torch.cuda.Event, torch.cuda.Event], str, list | None]] = deque()
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pair: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # the forward being launched
        self._wall = self._cpu = 0.0
        self._kind: str | None = None  # the kind of the step under way (None: no batch yet)
        self._batch: tuple[int, int] | None = None  # (tokens, sequences) of the step under way's batch
        self._box: list | None = None  # where the step under way's record goes for its forward's span
        self.trace: list[StepRecord] | None = None

    def step_started(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        self._kind = self._batch = self._box = None

    def step_kind(self, kind: str | None, tokens: int = 0, sequences: int = 0) -> None:
        """The step under way runs a batch of ``kind`` (one of KINDS; None: it failed, not counted by kind) with
        ``tokens`` tokens of ``sequences`` requests (kept by the trace; a failed step keeps its first call's)."""
        self._kind = kind
        if kind is not None or self._batch is None:
            self._batch = (tokens, sequences)

    def step_ended(self) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.thread_time() - self._cpu
        self.wall_s += wall
        self.cpu_s += cpu
        self.step_calls += 1
        if self.trace is not None and self._batch is not None:
            self.trace.append(record := StepRecord(self._wall, wall, cpu, self._kind, *self._batch))
            if self._box is not None:
                self._box.append(record)
        if self._kind is not None:
            sums = self.kinds[self._kind]
            sums[0] += 1
            sums[1] += wall
            sums[2] = max(sums[2], wall)

    def forward_launching(self) -> None:
        if not self._cuda:
            return
        while self._pending and self._pending[0][0][1].query():  # the forwards that have completed, oldest first
            (start, end), kind, box = pending = self._pending.popleft()
            span = start.elapsed_time(end) / 1e3
            self.forward_gpu_s += span
            self.forward_timed += 1
            self.kinds[kind][3] += span
            self.kinds[kind][4] += 1
            if box:
                box[0].forward_gpu_s = span
            self._spare.append(pending[0])
        if self._pair is not None:  # the last launch failed before its forward was queued: its pair is free again
            self._spare.append(self._pair)
        if len(self._pending) >= RING:
            self._spare.append(self._pending.popleft()[0])
            self.forward_dropped += 1
        self._pair = self._spare.pop() if self._spare else (torch.cuda.Event(enable_timing=True),
                                                            torch.cuda.Event(enable_timing=True))  # fmt: skip
        self._pair[0].record(torch.cuda.current_stream(self.device))

    def forward_queued(self) -> None:
        if self._pair is not None:
            self._pair[1].record(torch.cuda.current_stream(self.device))
            self._box = [] if self.trace is not None else None  # step_ended puts the step's record in
            self._pending.append((self._pair, self._kind or KINDS[1], self._box))
            self._pair = None

    def stats(self) -> dict[str, float]:
        return {"step_wall_s": self.wall_s, "step_cpu_s": self.cpu_s, "step_calls": self.step_calls,
                "forward_gpu_s": self.forward_gpu_s, "forward_timed": self.forward_timed,
                "forward_dropped": self.forward_dropped,
                **{f"{kind}_{name}": value for kind, sums in self.kinds.items()
                   for name, value in zip(KIND_SUMS, sums, strict=True)}}  # fmt: skip
