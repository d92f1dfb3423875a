# SPDX-License-Identifier: Apache-2.0
"""vkv.allocator: virtual ranges, physical pages and the page pool (CUDA VMM or Linux mmap)."""

from .driver import BACKENDS as BACKENDS
from .driver import Driver as Driver
from .driver import cuda_usable as cuda_usable
from .driver import get_driver as get_driver
from .errors import DeviceFullError as DeviceFullError
from .errors import DriverError as DriverError
from .errors import InvalidRequestError as InvalidRequestError
from .errors import OutOfPagesError as OutOfPagesError
from .errors import VkvError as VkvError
from .ledger import Ledger as Ledger
from .ledger import LedgerBusyError as LedgerBusyError
from .ledger import LedgerError as LedgerError
from .mapper import Mapper as Mapper
from .pool import PagePool as PagePool
from .pool import PoolStats as PoolStats
from .vrange import VirtualRange as VirtualRange
