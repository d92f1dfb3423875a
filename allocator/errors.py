# SPDX-License-Identifier: Apache-2.0
"""Errors raised by vkv. Every driver or syscall failure names the call and the code it returned."""

from __future__ import annotations


class VkvError(Exception):
    """Base class of every error vkv raises on purpose."""


class DriverError(VkvError):
    """A CUDA driver call or a Linux syscall failed.

    Attributes
    ----------
    call : str
        The failing call, e.g. ``"cuMemMap"`` or ``"mmap(MAP_FIXED)"``.
    code : int
        The driver's CUresult or the syscall's errno.
    name : str
        The symbolic name of ``code`` (``"CUDA_ERROR_OUT_OF_MEMORY"``, ``"ENOMEM"``).
    """

    def __init__(self, call: str, code: int, name: str, detail: str = ""):
        self.call, self.code, self.name = call, code, name
        message = f"{call} failed with {name} ({code})"
        super().__init__(f"{message}: {detail}" if detail else message)


class OutOfPagesError(VkvError, MemoryError):
    """A growth needs more physical pages than the pool's budget allows (or than the device has room for:
    :class:`DeviceFullError`). Nothing was changed."""


class DeviceFullError(OutOfPagesError):
    """The budget allows the pages but the device has no memory left to create them (cuMemCreate returned
    CUDA_ERROR_OUT_OF_MEMORY; on the host backend, fallocate ENOMEM or ENOSPC): other processes, or this one's
    own allocations beside the KV, hold it. Handled as the budget's refusal is (the request waits, or the newest
    is preempted); the driver's error is the ``__cause__``. Nothing was changed."""


MEMORY_EXHAUSTED = frozenset({"CUDA_ERROR_OUT_OF_MEMORY", "ENOMEM", "ENOSPC"})  # DriverError.name: no memory left


class InvalidRequestError(VkvError, ValueError):
    """An argument was out of range or in the wrong state (a slot freed twice, a length too long, ...).

    Raised before anything is changed.
    """
