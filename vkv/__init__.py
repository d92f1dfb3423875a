# SPDX-License-Identifier: Apache-2.0
"""vkv: an elastic, virtualized KV cache for LLM serving.

Each model reserves one contiguous virtual range for its KV cache; physical pages are mapped beneath
it as tokens arrive and go back to a pool that co-located models share.
"""

from vkv.allocator import DeviceFullError as DeviceFullError
from vkv.allocator import DriverError as DriverError
from vkv.allocator import InvalidRequestError as InvalidRequestError
from vkv.allocator import Ledger as Ledger
from vkv.allocator import LedgerError as LedgerError
from vkv.allocator import Mapper as Mapper
from vkv.allocator import OutOfPagesError as OutOfPagesError
from vkv.allocator import PagePool as PagePool
from vkv.allocator import VirtualRange as VirtualRange
from vkv.allocator import VkvError as VkvError
from vkv.allocator import get_driver as get_driver

from .cache import CacheStats as CacheStats
from .cache import KVCache as KVCache
from .layout import CacheConfig as CacheConfig
from .layout import KVLayout as KVLayout

__version__ = "0.1.0"


def __getattr__(name: str):
    # The attention wrapper pulls in Triton and the kernels: import it only when asked for.
    if name in ("AttentionWrapper", "Plan"):
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'vkv' has no attribute {name!r}")
