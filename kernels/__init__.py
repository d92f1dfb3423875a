# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of vkv and their torch references.

They take tensors, strides and lengths and know nothing of allocation; the caller guarantees that every
token below a request's length is mapped, and the kernels read nothing at or beyond it.
"""

from ._common import DecodeConfig as DecodeConfig
from ._common import choose_num_splits as choose_num_splits
from ._common import decode_config as decode_config
from .decode import decode_attention as decode_attention
from .decode import decode_attention_reference as decode_attention_reference
from .extend import ExtendConfig as ExtendConfig
from .extend import extend_attention as extend_attention
from .extend import extend_attention_reference as extend_attention_reference
from .paged_decode import paged_decode_attention as paged_decode_attention
from .paged_decode import paged_decode_attention_reference as paged_decode_attention_reference
from .store import store_kv as store_kv
from .store import store_kv_reference as store_kv_reference
