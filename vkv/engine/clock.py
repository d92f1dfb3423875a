# SPDX-License-Identifier: Apache-2.0
"""Where an engine's step time goes, summed over its steps (``Engine.stats()``; bench/serve.py divides by steps)."""

from __future__ import annotations

import time

import torch


class StepClock:
    """The stepping thread's wall and CPU time in ``Engine.step()``, and on a GPU the forward's span on the device
    (CUDA events around the launch of each step's forward, read at the next step's, once they have completed).

    Read together, per step: wall far above CPU + the forward's span means the thread waited (for the GIL, or the
    OS); a forward's span longer than in an offline run means its launches were held up (eager launches are Python)
    or the GPU ran other work meanwhile."""

    def __init__(self, device: torch.device):
        self.wall_s = self.cpu_s = self.forward_gpu_s = 0.0
        self.forward_timed = 0  # the steps whose forward span is in forward_gpu_s
        self.device = device
        cuda = device.type == "cuda"
        self._pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        self._pending = False  # the pair holds a forward not yet read
        self._wall = self._cpu = 0.0

    def step_started(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def step_ended(self) -> None:
        self.wall_s += time.perf_counter() - self._wall
        self.cpu_s += time.thread_time() - self._cpu

    def forward_launching(self) -> None:
        if self._pair is None:
            return
        start, end = self._pair
        if self._pending and end.query():  # the last forward's (its step synchronized on its tokens since)
            self.forward_gpu_s += start.elapsed_time(end) / 1e3
            self.forward_timed += 1
        self._pending = False  # a pair not complete by now (never: the step waited for it) is dropped
        start.record(torch.cuda.current_stream(self.device))

    def forward_queued(self) -> None:
        if self._pair is not None:
            self._pair[1].record(torch.cuda.current_stream(self.device))
            self._pending = True

    def stats(self) -> dict[str, float]:
        return {"step_wall_s": self.wall_s, "step_cpu_s": self.cpu_s, "forward_gpu_s": self.forward_gpu_s,
                "forward_timed": self.forward_timed}  # fmt: skip
