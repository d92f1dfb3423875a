# SPDX-License-Identifier: Apache-2.0
"""The cuda backend: CUDA virtual memory management through cuda.bindings.driver.

Works in the primary context of the chosen device, the context torch and Triton use, so tensors made
over a mapped range are ordinary CUDA tensors to both. Every call's CUresult is checked. Pages are created on,
and mapped for, the driver's device alone (the location of cuMemCreate and cuMemSetAccess): drivers of several
devices may share a process and its threads.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from cuda.bindings import driver as cu

from .checks import check_count, check_positive
from .driver import Driver
from .errors import DriverError, InvalidRequestError

_SUCCESS = cu.CUresult.CUDA_SUCCESS
_current = threading.local()  # the context this module last made current on a thread, whichever driver did


def check(call: str, result: tuple) -> Any:
    """Raise DriverError unless ``result[0]`` is CUDA_SUCCESS; return the remaining value(s)."""
    err = result[0]
    if err != _SUCCESS:
        status, text = cu.cuGetErrorString(err)
        detail = text.decode() if status == _SUCCESS and text else ""
        raise DriverError(call, int(err), getattr(err, "name", str(err)), detail)
    if len(result) <= 2:
        return result[1] if len(result) == 2 else None
    return tuple(result[1:])


class _CudaArray:
    """The minimal __cuda_array_interface__ torch.as_tensor needs to wrap a device address."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (addr, False),
            "version": 3,
            "strides": None,
        }


class CudaDriver(Driver):
    """Physical pages are cuMemCreate handles of ``page_size`` bytes, mapped with read/write access."""

    name = "cuda"

    def __init__(self, page_size: int | None = None, device: int | None = None):
        page_size = None if page_size is None else check_positive("page_size", page_size, hi=1 << 40)
        device = None if device is None else check_count("device", device)
        if not torch.cuda.is_available():
            raise InvalidRequestError("the cuda backend needs a CUDA GPU, and torch sees none; use backend='host'")
        torch.cuda.init()
        count = torch.cuda.device_count()
        if device is not None and device >= count:
            raise InvalidRequestError(
                f"device {device} does not exist: torch sees {count} CUDA device(s), expected an index in [0, {count})"
            )
        self.index = torch.cuda.current_device() if device is None else device
        check("cuInit", cu.cuInit(0))
        self._cu_device = check("cuDeviceGet", cu.cuDeviceGet(self.index))
        self._context = check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._cu_device))
        self._context_id = int(self._context)
        self._make_current()

        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = self.index
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = self.index
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access_list = [self._access]

        self.granularity = check(
            "cuMemGetAllocationGranularity",
            cu.cuMemGetAllocationGranularity(
                self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
            ),
        )
        page_size = self.granularity if page_size is None else page_size
        if page_size % self.granularity:
            raise InvalidRequestError(
                f"cuda page_size {page_size} must be a positive multiple of the granularity {self.granularity}"
            )
        self.page_size = page_size

    def _make_current(self) -> None:
        # The driver's current context is per thread (the mapper's thread needs it too), and drivers of other
        # devices may have set theirs on this thread since: kept per thread for all drivers, not per driver.
        if getattr(_current, "context", None) == self._context_id:
            return
        check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._context))
        _current.context = self._context_id

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def reserve(self, nbytes: int) -> int:
        self.check_aligned("reserve size", nbytes)
        if nbytes <= 0:
            raise InvalidRequestError(f"reserve size must be positive, got {nbytes}")
        self._make_current()
        return int(check("cuMemAddressReserve", cu.cuMemAddressReserve(nbytes, self.page_size, 0, 0)))

    def free_range(self, addr: int, nbytes: int) -> None:
        self._make_current()
        check("cuMemAddressFree", cu.cuMemAddressFree(addr, nbytes))

    def create_page(self) -> Any:
        self._make_current()
        return check("cuMemCreate", cu.cuMemCreate(self.page_size, self._prop, 0))

    def release_page(self, handle: Any) -> None:
        self._make_current()
        check("cuMemRelease", cu.cuMemRelease(handle))

    def map(self, addr: int, handle: Any) -> None:
        # The hot call (one per page grown): bare calls, no helper layers beyond check().
        size = self.page_size
        if addr % size:
            self.check_aligned("map address", addr)
        self._make_current()
        check("cuMemMap", cu.cuMemMap(addr, size, 0, handle, 0))
        try:
            check("cuMemSetAccess", cu.cuMemSetAccess(addr, size, self._access_list, 1))
        except DriverError:
            cu.cuMemUnmap(addr, self.page_size)
            raise

    def unmap(self, addr: int) -> None:
        self.unmap_range(addr, self.page_size)

    def unmap_range(self, addr: int, nbytes: int) -> None:
        self._make_current()
        check("cuMemUnmap", cu.cuMemUnmap(addr, nbytes))  # one call may span many mappings

    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)

    def memory_info(self) -> tuple[int, int]:
        # Of the current context's device: set it whatever this thread did since (torch may have switched it).
        check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._context))
        _current.context = self._context_id
        free, total = check("cuMemGetInfo", cu.cuMemGetInfo())
        return int(free), int(total)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def record_event(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_event(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()

    def describe(self) -> str:
        return f"cuda on {torch.cuda.get_device_name(self.index)} ({self.device}), page {self.page_size >> 10} KiB"
