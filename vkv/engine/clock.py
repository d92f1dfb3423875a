# SPDX-License-Identifier: Apache-2.0
"""Where an engine's step time goes, summed over its steps (``Engine.stats()``; bench/serve.py divides by steps)."""

from __future__ import annotations

import time
from collections import deque

import torch

RING = 8  # event pairs of forwards not yet read: steps that sample nothing do not wait for theirs


class StepClock:
    """The stepping thread's wall and CPU time in ``Engine.step()`` (``step_calls``: every call, a batch or not), and
    on a GPU the forward's span on the device: CUDA events around the launch of each step's forward, read at a later
    launch once they have completed (a step that samples nothing does not wait for its forward, so its pair may stay
    pending a few steps; past RING pending pairs the oldest is dropped and counted).

    Read together, per step: wall far above CPU + the forward's span means the thread waited (for the GIL, or the
    OS); a forward's span longer than in an offline run means its launches were held up (eager launches are Python)
    or the GPU ran other work meanwhile."""

    def __init__(self, device: torch.device):
        self.wall_s = self.cpu_s = self.forward_gpu_s = 0.0
        self.step_calls = self.forward_timed = self.forward_dropped = 0
        self.device = device
        self._cuda = device.type == "cuda"
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # launched, not yet read
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pair: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # the forward being launched
        self._wall = self._cpu = 0.0

    def step_started(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def step_ended(self) -> None:
        self.wall_s += time.perf_counter() - self._wall
        self.cpu_s += time.thread_time() - self._cpu
        self.step_calls += 1

    def forward_launching(self) -> None:
        if not self._cuda:
            return
        while self._pending and self._pending[0][1].query():  # the forwards that have completed, oldest first
            start, end = pair = self._pending.popleft()
            self.forward_gpu_s += start.elapsed_time(end) / 1e3
            self.forward_timed += 1
            self._spare.append(pair)
        if self._pair is not None:  # the last launch failed before its forward was queued: its pair is free again
            self._spare.append(self._pair)
        if len(self._pending) >= RING:
            self._spare.append(self._pending.popleft())
            self.forward_dropped += 1
        self._pair = self._spare.pop() if self._spare else (torch.cuda.Event(enable_timing=True),
                                                            torch.cuda.Event(enable_timing=True))  # fmt: skip
        self._pair[0].record(torch.cuda.current_stream(self.device))

    def forward_queued(self) -> None:
        if self._pair is not None:
            self._pair[1].record(torch.cuda.current_stream(self.device))
            self._pending.append(self._pair)
            self._pair = None

    def stats(self) -> dict[str, float]:
        return {"step_wall_s": self.wall_s, "step_cpu_s": self.cpu_s, "step_calls": self.step_calls,
                "forward_gpu_s": self.forward_gpu_s, "forward_timed": self.forward_timed,
                "forward_dropped": self.forward_dropped}  # fmt: skip
