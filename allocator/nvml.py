# SPDX-License-Identifier: Apache-2.0
"""NVML's view of the processes holding memory on this machine's NVIDIA GPUs (cuda.bindings.nvml).

The ledger asks it whether a process that has died still holds device memory: the driver frees a killed
process's memory after the process is gone from /proc (tens of ms on an H100; `bench/stress.py`), so its
pages keep counting until NVML no longer lists it. The stress benchmark reads each member's bytes here.
"""

from __future__ import annotations

import os
import threading

NVML_NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE: a process whose memory NVML cannot tell


def per_process(infos) -> dict[int, int]:
    """{pid: bytes} from one nvmlDeviceGetComputeRunningProcesses answer: records with ``pid`` and
    ``used_gpu_memory`` (cuda.bindings.nvml's ProcessInfo array); a record without a figure is left out."""
    used: dict[int, int] = {}
    for info in infos:
        pid, nbytes = int(info.pid), int(info.used_gpu_memory)
        if nbytes != NVML_NOT_AVAILABLE:
            used[pid] = used.get(pid, 0) + nbytes
    return used


class DeviceMemory:
    """The device memory each process holds, through NVML, over every GPU of the machine (or those ``focus``
    kept). ``why`` says why not where NVML is unusable (no library, driver or binding): then ``used`` and
    ``holders`` give None."""

    def __init__(self):
        self.handles, self.why = [], None
        try:
            from cuda.bindings import nvml

            nvml.init_v2()
            self.query = nvml.device_get_compute_running_processes_v3
            self.handles = [nvml.device_get_handle_by_index_v2(i) for i in range(nvml.device_get_count_v2())]
        except Exception as exc:  # noqa: BLE001 - no NVML: the caller falls back
            self.why = f"NVML unusable: {type(exc).__name__}: {str(exc)[:200]}"

    def used(self) -> dict[int, int] | None:
        """{pid: bytes} of every process with a compute context on these GPUs; None if NVML fails."""
        if self.why is not None:
            return None
        used: dict[int, int] = {}
        try:
            for handle in self.handles:
                for pid, nbytes in per_process(self.query(handle)).items():
                    used[pid] = used.get(pid, 0) + nbytes
        except Exception:  # noqa: BLE001 - a failed query is a sample without a figure
            return None
        return used

    def holders(self) -> set[int] | None:
        """The pids with a compute context on these GPUs, with or without a figure; None if NVML fails."""
        if self.why is not None:
            return None
        try:
            return {int(info.pid) for handle in self.handles for info in self.query(handle)}
        except Exception:  # noqa: BLE001 - unknown: the caller decides without it
            return None

    def focus(self, pids: set[int]) -> None:
        """Query only the GPUs that hold one of ``pids`` from now on (all of them if none does)."""
        try:
            held = [h for h in self.handles if pids & set(per_process(self.query(h)))]
        except Exception:  # noqa: BLE001
            return
        self.handles = held or self.handles


_shared: tuple[int, DeviceMemory] | None = None
_shared_lock = threading.Lock()


def _forget_after_fork() -> None:  # the child makes its own (a lock held by a parent's thread would never free)
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def device_holders() -> set[int] | None:
    """``DeviceMemory().holders()`` of one DeviceMemory a process (made on first use, again after a fork)."""
    global _shared
    shared = _shared
    if shared is None or shared[0] != os.getpid():
        memory = DeviceMemory()  # NVML's init, outside the lock: two threads may both make one, one is kept
        with _shared_lock:
            if _shared is None or _shared[0] != os.getpid():
                _shared = (os.getpid(), memory)
            shared = _shared
    return shared[1].holders()
