# SPDX-License-Identifier: Apache-2.0
"""KV layout math: where each (slot, token, layer, k|v) lives in a model's one virtual range.

token-major (default): ``[slot][token][layer][k|v][kv_head][head_dim]``. A token's K and V of every
layer are adjacent, so growing a request by n tokens maps n * token_bytes of one slot, and a request
wastes less than one page.

layer-major (vAttention's): ``[layer][k|v][slot][token][kv_head][head_dim]``: 2 * num_layers planes,
each slot page-aligned in every plane, so a request wastes up to one page per plane.

grouped: ``[group][slot][token][layer in group][k|v][kv_head][head_dim]``, groups of ``group_layers``
consecutive layers: token-major within each of num_layers / group_layers planes. A row holds
group_layers layers instead of all num_layers, so a page holds num_layers / group_layers times more
tokens than token-major's: a slot grows in coarser steps (a page of every plane), and each layer reads
more of every page it touches (docs/elastic.md: token-major's decode loses ~2% to the scattered pages
growth maps, grouped and layer-major nothing).

Either way a layer's K (or V) is one strided tensor ``[max_slots, max_seq_len, kv_heads, head_dim]``
with unit-stride head_dim, which is all the kernels need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError
from vkv.allocator.checks import INT64_MAX, is_int

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LAYOUTS = ("token", "layer", "grouped")
MAX_FIELD = 1 << 31  # the most of any count of a CacheConfig (layers, heads, head_dim, slots, tokens)


def _positive(name: str, value: int) -> int:
    if not is_int(value) or not 0 < value <= MAX_FIELD:
        raise InvalidRequestError(f"{name} must be a positive int (at most 2**31), got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """A model's KV cache geometry.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        The model's attention shape.
    dtype : torch.dtype
        torch.bfloat16, torch.float16 or torch.float32.
    max_slots : int
        Requests that can hold KV at once (one slot each).
    max_seq_len : int
        Most tokens per request.
    layout : str
        ``"token"`` (token-major, default), ``"layer"`` (layer-major) or ``"grouped"``.
    group_layers : int | None
        Layers per plane of the grouped layout (a divisor of num_layers); only with ``layout="grouped"``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    max_slots: int = 64
    max_seq_len: int = 4096
    layout: str = "token"
    group_layers: int | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_slots", "max_seq_len"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))  # numpy ints become ints
        if not isinstance(self.dtype, torch.dtype) or self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r} is not supported; expected one of {DTYPES}")
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            raise InvalidRequestError(f"layout {self.layout!r} is not supported; expected one of {LAYOUTS}")
        if self.layout == "grouped":
            g = self.group_layers
            if not is_int(g) or g <= 0 or self.num_layers % g:
                raise InvalidRequestError(
                    f"the grouped layout needs group_layers, a positive divisor of num_layers = {self.num_layers}; "
                    f"got {g!r}"
                )
            object.__setattr__(self, "group_layers", int(g))
        elif self.group_layers is not None:
            raise InvalidRequestError(
                f"group_layers = {self.group_layers!r} is only for layout='grouped', not layout={self.layout!r}"
            )

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_bytes(self) -> int:
        """K and V of one token across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.elem_size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class KVLayout:
    """Byte offsets and page indices of a :class:`CacheConfig` over pages of ``page_size`` bytes.

    The range is ``planes`` planes of ``max_slots`` page-aligned slots. In a plane, slot s's token t
    starts at ``plane * plane_bytes + s * slot_bytes + t * row_bytes``: one plane of whole tokens for
    token-major, one plane per (layer, k|v) for layer-major, one per group of ``group_layers`` layers
    (their K and V rows of a token) for grouped.
    """

    def __init__(self, config: CacheConfig, page_size: int):
        self.config, self.page_size = config, page_size
        elem = config.elem_size
        head_bytes = config.num_kv_heads * config.head_dim * elem
        # layers per plane: each plane's row holds K and V of that many layers (layer-major splits K from V)
        self.plane_layers = {"token": config.num_layers, "grouped": config.group_layers, "layer": None}[config.layout]
        if self.plane_layers is None:
            self.planes, self.row_bytes = 2 * config.num_layers, head_bytes
        else:
            self.planes, self.row_bytes = config.num_layers // self.plane_layers, self.plane_layers * 2 * head_bytes
        self.slot_bytes = _round_up(config.max_seq_len * self.row_bytes, page_size)
        self.plane_bytes = config.max_slots * self.slot_bytes
        self.total_bytes = self.planes * self.plane_bytes
        if self.total_bytes > INT64_MAX:
            raise InvalidRequestError(
                f"this cache would reserve {self.total_bytes} bytes of address space; expected at most 2**63 - 1 "
                "(fewer slots, layers, heads or tokens)"
            )
        self.pages_per_slot = self.slot_bytes // page_size
        self.num_pages = self.total_bytes // page_size

    def pages_per_plane(self, num_tokens: int) -> int:
        """Pages one plane of a slot needs to hold ``num_tokens`` tokens."""
        return -(-num_tokens * self.row_bytes // self.page_size)

    def slot_pages(self, slot: int, stop: int, start: int = 0) -> list[int]:
        """Range page indices of pages [start, stop) of each of ``slot``'s planes."""
        first = [p * (self.plane_bytes // self.page_size) + slot * self.pages_per_slot for p in range(self.planes)]
        return [f + i for f in first for i in range(start, stop)]

    def tokens_in(self, pages_per_plane: int) -> int:
        """Whole tokens held by the first ``pages_per_plane`` pages of a slot's planes."""
        return min(self.config.max_seq_len, pages_per_plane * self.page_size // self.row_bytes)

    def view(self, buffer: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
        """Layer ``layer``'s K (kv=0) or V (kv=1) as ``[max_slots, max_seq_len, kv_heads, head_dim]``.

        ``buffer`` is the whole range as a 1-D tensor of the config's dtype.
        """
        c = self.config
        elem = c.elem_size
        g = self.plane_layers
        if g is None:
            offset = (2 * layer + kv) * self.plane_bytes // elem
        else:  # plane layer // g, row part (layer % g, kv)
            offset = (layer // g) * self.plane_bytes // elem + (2 * (layer % g) + kv) * c.num_kv_heads * c.head_dim
        return buffer.as_strided(
            (c.max_slots, c.max_seq_len, c.num_kv_heads, c.head_dim),
            (self.slot_bytes // elem, self.row_bytes // elem, c.head_dim, 1),
            offset,
        )
