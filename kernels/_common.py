# SPDX-License-Identifier: Apache-2.0
"""What the attention launchers share: argument checks, jit helpers, the split reduce and the split planning.

Names: ``max_seq_len`` is a slot's size in tokens (k_cache.shape[1]); ``max_len`` is a host-side bound on the
longest sequence of a step. Every check raises InvalidRequestError (a ValueError) with a message that names
the argument, says what was wrong and what was expected; all read only tensor metadata (shape, dtype,
strides, device), so none synchronises.

The split reduce combines the per-split partial outputs of decode.py and paged_decode.py by log-sum-exp, as
in Flash-Decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait
from triton.runtime.interpreter import InterpretedFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from vkv.allocator.checks import is_int
from vkv.allocator.errors import InvalidRequestError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)

# In-tile offsets (arange(BLOCK) * stride) are int32 inside the kernels; tile bases are int64.
MAX_IN_TILE_OFFSET = 2**31 - 1

# ---------------------------------------------------------------------------------------------------
# Argument checks.


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    shape: Sequence[int | None],
    dims: str,
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
    unit_last_stride: bool = False,
    contiguous: bool = False,
) -> None:
    """Check one tensor. ``shape`` entries of None match any size; ``dims`` names the axes for messages."""
    if not isinstance(t, torch.Tensor):
        raise InvalidRequestError(f"{name} must be a torch.Tensor of shape [{dims}], got {type(t).__name__}")
    if t.dim() != len(shape):
        raise InvalidRequestError(f"{name} must be {len(shape)}-D [{dims}], got shape {tuple(t.shape)}")
    for axis, (got, want) in enumerate(zip(t.shape, shape, strict=True)):
        if want is not None and got != want:
            raise InvalidRequestError(
                f"{name} has shape {tuple(t.shape)}; expected [{dims}] = "
                f"{tuple('*' if s is None else s for s in shape)} (axis {axis} is {got}, expected {want})"
            )
    if t.dtype not in dtypes:
        raise InvalidRequestError(f"{name} has dtype {t.dtype}; expected {_names(dtypes)}")
    if device is not None and t.device != device:
        raise InvalidRequestError(f"{name} is on {t.device}; expected the same device as the query ({device})")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidRequestError(f"{name} must have unit stride on its last axis (head_dim); got strides {t.stride()}")
    if contiguous and not t.is_contiguous():
        raise InvalidRequestError(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise InvalidRequestError(f"{name} has dtype {t.dtype}; expected the dtype of {ref_name} ({ref.dtype})")


def check_in_tile_offsets(name: str, stride: int, block: int) -> None:
    """Kernels add arange(block) * stride as int32; reject strides that would overflow it."""
    if stride * block > MAX_IN_TILE_OFFSET:
        raise InvalidRequestError(
            f"{name} stride {stride} elements is too large: {block} rows of it exceed int32 offsets; "
            f"expected a stride below {MAX_IN_TILE_OFFSET // block}"
        )


def check_runnable(kernel: object, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before vkv.kernels is imported); pass
    ``dtype`` for kernels that multiply with tl.dot (see :func:`check_interpretable`)."""
    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cpu" and not interpreted:
        raise InvalidRequestError(
            "tensors are on the CPU but the Triton kernels were compiled for a GPU; expected CUDA tensors, "
            "or TRITON_INTERPRET=1 set in the environment before vkv.kernels is imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(
            f"tensors are on {device}; expected a CUDA device (or the CPU under TRITON_INTERPRET=1)"
        )
    if dtype == torch.bfloat16 and interpreted:
        raise InvalidRequestError(_INTERPRETED_BFLOAT16)


@triton.jit
def _probe():
    pass


_INTERPRETED_BFLOAT16 = (
    "bfloat16 attention cannot run under Triton's interpreter (TRITON_INTERPRET=1): it computes bfloat16 dot "
    "products wrongly; expected float16 or float32 on the CPU, or a CUDA GPU for bfloat16"
)


def check_interpretable(dtype: torch.dtype) -> None:
    """Triton's interpreter computes tl.dot over bfloat16 wrongly (|out| ~8e8 for |V| ~4, no error): refuse it
    where vkv's kernels run interpreted."""
    if dtype == torch.bfloat16 and isinstance(_probe, InterpretedFunction):
        raise InvalidRequestError(_INTERPRETED_BFLOAT16)


# The int32 index tensors the launchers take, and their axes (B: the requests).
INDEX_DIMS = {"slot_ids": "B", "seq_lens": "B", "cu_seqlens_q": "B + 1", "block_table": "B, max_blocks_per_seq"}


def _index_shape(name: str, batch: int | None) -> tuple[int | None, ...]:
    rows = None if batch is None else batch + (name == "cu_seqlens_q")
    return (rows, None) if name == "block_table" else (rows,)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: dict[str, object],
    out: torch.Tensor | None,
    lse: torch.Tensor | None = None,
    *,
    kernel: object,
    q_dims: str,
    kv_names: tuple[str, str] = ("k_cache", "v_cache"),
    kv_dims: str = "num_slots, max_seq_len, Hkv, D",
) -> tuple[torch.Tensor, int]:
    """The launchers' common preamble; returns (out, the GQA group Hq / Hkv), out allocated if None.

    Checks, in order: q [*, Hq, D] (a float dtype, unit stride on D); K and V [*, *, Hkv, D] in q's dtype and
    device with unit stride on D, V shaped like K; Hq a multiple of Hkv; the ``index`` tensors (int32 on q's
    device, shaped as INDEX_DIMS says, 1-D ones contiguous, block_table with unit stride on its last axis),
    where B is q's first axis if ``q_dims`` starts with it, else the first index tensor's length; out shaped
    like q in q's dtype; lse [B, Hq] float32; that ``kernel`` can run on q's device in q's dtype.
    """
    check_tensor("q", q, shape=(None, None, None), dims=q_dims, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    num_q_heads, head_dim = q.shape[1:]
    k_name, v_name = kv_names
    _check_kv(k_name, k, q, kv_dims)
    _check_kv(v_name, v, q, kv_dims, num_kv_heads=k.shape[2])
    if v.shape[:2] != k.shape[:2]:
        raise InvalidRequestError(f"{v_name} has shape {tuple(v.shape)}; expected {k_name}'s {tuple(k.shape)}")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise InvalidRequestError(f"Hq={num_q_heads} query heads must be a multiple of Hkv={num_kv_heads} KV heads")
    batch = q.shape[0] if q_dims.startswith("B,") else None
    for name, t in index.items():
        one_d = name != "block_table"
        check_tensor(
            name,
            t,
            shape=_index_shape(name, batch),
            dims=INDEX_DIMS[name],
            dtypes=INDEX_DTYPES,
            device=q.device,
            unit_last_stride=not one_d,
            contiguous=one_d,
        )
        batch = t.shape[0] if batch is None else batch
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, shape=q.shape, dims=q_dims, dtypes=(q.dtype,), device=q.device, unit_last_stride=True)
    if lse is not None:
        check_tensor("lse", lse, shape=q.shape[:2], dims="B, Hq", dtypes=(torch.float32,), device=q.device)
    check_runnable(kernel, q.device, q.dtype)
    return out, num_q_heads // num_kv_heads


def _check_kv(name: str, t: torch.Tensor, q: torch.Tensor, dims: str, num_kv_heads: int | None = None) -> None:
    shape = (None, None, num_kv_heads, q.shape[2])
    check_tensor(name, t, shape=shape, dims=dims, dtypes=FLOAT_DTYPES, device=q.device, unit_last_stride=True)
    check_same_dtype(name, t, "q", q)


def check_token_strides(kv: Sequence[tuple[str, torch.Tensor]], block_n: int) -> None:
    """A K/V tile adds arange(block_n) * the token stride (axis 1) as int32."""
    for name, t in kv:
        check_in_tile_offsets(f"{name} token", t.stride(1), block_n)


def length_hint(name: str, value: object) -> int | None:
    """A host-side length bound as an int (numpy integers become ints), or None."""
    if value is not None and (not is_int(value) or value < 0):
        raise InvalidRequestError(f"{name} must be a non-negative int or None, got {value!r}")
    return None if value is None else int(value)


def check_lengths_and_slots(longest: int, low_slot: int, high_slot: int, *, num_slots: int, max_seq_len: int) -> None:
    """The longest length and the extreme slots of non-empty requests, read from the device in one sync."""
    if longest > max_seq_len:
        raise InvalidRequestError(
            f"seq_lens has length {longest}; expected at most the cache's max_seq_len {max_seq_len}"
        )
    if low_slot < 0 or high_slot >= num_slots:
        bad = low_slot if low_slot < 0 else high_slot
        raise InvalidRequestError(
            f"slot_ids has slot {bad} for a non-empty request; expected slots in [0, {num_slots})"
        )


LOG2_E = 1.4426950408889634
FLOAT32_MAX = 3.4028234663852886e38


def log2_softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """The kernels' score scale: sm_scale (default 1 / sqrt(head_dim)) times log2(e), as they use exp2.

    The scale must be a positive number, finite as a float32: the kernels take the row max before scaling.
    """
    try:
        scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)  # also numpy and 0-d tensor scalars
    except (TypeError, ValueError, RuntimeError, OverflowError):
        scale = math.nan
    scaled = scale * LOG2_E
    not_a_number = isinstance(sm_scale, (bool, np.bool_, str, bytes, bytearray)) or (
        isinstance(sm_scale, torch.Tensor) and not sm_scale.is_floating_point()
    )  # float() would take "1.0", b"1" and True
    if not_a_number or not 0 < scaled <= FLOAT32_MAX:  # the kernels take it as a float32
        shown = repr(sm_scale) if len(repr(sm_scale)) <= 80 else repr(sm_scale)[:77] + "..."
        raise InvalidRequestError(f"sm_scale must be a positive finite number or None, got {shown}")
    return scaled


# ---------------------------------------------------------------------------------------------------
# Host helpers for the launches.


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_d_for(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_views(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> tuple[object, object] | None:
    """TMA descriptors over K and V seen as [num_slots, max_seq_len, Hkv * D], or None where a view does not
    fit that shape or TMA's rules (then the kernel loads every tile through pointers).

    A tile is [1, BLOCK_N, D]: BLOCK_N tokens of one head. The kernels read through a descriptor only
    tiles whose tokens all lie below the request's length, so they never touch an unmapped page; partial
    tiles still use masked pointer loads.
    """
    if k_cache.device.type == "cuda" and torch.cuda.get_device_capability(k_cache.device)[0] < 9:
        return None  # TMA needs sm_90 or newer; the interpreter emulates it on the CPU
    num_slots, max_seq_len, num_kv_heads, head_dim = k_cache.shape
    if head_dim != block_d_for(head_dim) or 0 in k_cache.shape:
        return None
    descs = []
    for t in (k_cache, v_cache):
        stride_s, stride_t, stride_h, _ = t.stride()
        itemsize = t.element_size()
        if stride_h != head_dim or (stride_s * itemsize) % 16 or (stride_t * itemsize) % 16 or t.data_ptr() % 16:
            return None
        descs.append(
            TensorDescriptor(
                t, [num_slots, max_seq_len, num_kv_heads * head_dim], [stride_s, stride_t, 1], [1, block_n, head_dim]
            )
        )
    return descs[0], descs[1]


# ---------------------------------------------------------------------------------------------------
# Jit helpers.


@triton.jit
def visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, max_seq_len, CHECK_SLOT: tl.constexpr):
    """Tokens request b may read: seq_lens[b] clamped to [0, max_seq_len]; 0 if its slot is out of range."""
    n = tl.load(seq_lens_ptr + b)
    n = tl.minimum(tl.maximum(n, 0), max_seq_len)
    if CHECK_SLOT:
        slot = tl.load(slot_ids_ptr + b)
        n = tl.where((slot >= 0) & (slot < num_slots), n, 0)
    return n


@triton.jit
def attend_tile(q, k, v, valid_n, m_i, l_i, acc, qk_scale, INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr = True):
    """One online-softmax step over a [BLOCK_N, BLOCK_D] tile of K and V (scores in log2 units). Columns
    where valid_n is False score -inf; with MASK_N=False every column is valid and valid_n is ignored."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_split(
    acc, m_i, l_i, o_ptr, lse_ptr, b, heads, split, offs_d, mask_g, mask_d,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    HAS_LSE: tl.constexpr,
):  # fmt: skip
    """Write acc / l (0 where nothing was read) and lse = ln(sum exp) (-inf where nothing was read)."""
    read = l_i > 0
    l_safe = tl.where(read, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + split * stride_os + heads[:, None] * stride_oh
    tl.store(o_ptrs + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    if HAS_LSE:
        lse = tl.where(read, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + split * stride_ls + heads * stride_lh, lse, mask=mask_g)


# ---------------------------------------------------------------------------------------------------
# The split reduce: partials o [B, Hq, S, D] and lse [B, Hq, S] (float32) -> out [B, Hq, D], lse [B, Hq].


@triton.jit
def _reduce_splits_kernel(
    o_part_ptr, lse_part_ptr, seq_lens_ptr, slot_ids_ptr, out_ptr, lse_ptr,
    num_slots, max_seq_len, tokens_per_split, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lpb, stride_lph, stride_lps,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    CHECK_SLOT: tl.constexpr, HAS_LSE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Combine the used splits of one (query head, request): o = sum_s exp(lse_s - lse) o_s."""
    head = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, max_seq_len, CHECK_SLOT)
    used = tl.minimum(tl.cdiv(seq_len, tokens_per_split), num_splits)
    if PDL:  # launched early (programmatic dependent launch): wait until the split kernel's writes are visible
        gdc_wait()

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    o_base = o_part_ptr + b.to(tl.int64) * stride_pb + head * stride_ph
    l_base = lse_part_ptr + b.to(tl.int64) * stride_lpb + head * stride_lph
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        splits = s0 + offs_s
        mask_s = splits < used
        lse_s = tl.load(l_base + splits * stride_lps, mask=mask_s, other=float("-inf"))
        o_s = tl.load(
            o_base + splits[:, None] * stride_ps + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
        )
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new

    read = total > 0
    o = acc / tl.where(read, total, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d
    )
    if HAS_LSE:
        # -inf where nothing was read; a NaN partial (paged_decode's out-of-range blocks) stays NaN
        lse = tl.where(total == 0, float("-inf"), m + tl.log(total))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + head * stride_lh, lse)


REDUCE_BLOCK_S = 16  # splits combined per step of the reduce kernel


def split_outputs(
    out: torch.Tensor, lse: torch.Tensor | None, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...], tuple[int, ...]]:
    """Where the split kernel writes: out/lse directly for one split, float32 partials otherwise."""
    if num_splits == 1:
        lse_strides = (lse.stride(0), lse.stride(1), 0) if lse is not None else (0, 0, 0)
        return out, lse, (out.stride(0), out.stride(1), 0), lse_strides
    batch, num_q_heads, head_dim = out.shape
    o_part = torch.empty(batch, num_q_heads, num_splits, head_dim, device=out.device, dtype=torch.float32)
    lse_part = torch.empty(batch, num_q_heads, num_splits, device=out.device, dtype=torch.float32)
    return o_part, lse_part, o_part.stride()[:3], lse_part.stride()


def reduce_splits(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    num_slots: int,
    max_seq_len: int,
    tokens_per_split: int,
    pdl: bool = False,
) -> None:
    """Launch the reduce kernel over partials [B, Hq, S, D] / [B, Hq, S]; pdl: see :func:`use_pdl`."""
    batch, num_q_heads, num_splits, head_dim = o_part.shape
    launch = {"launch_pdl": True} if pdl else {}  # only then: the interpreter knows no such option
    _reduce_splits_kernel[(num_q_heads, batch)](
        o_part, lse_part, seq_lens, slot_ids if slot_ids is not None else seq_lens, out,
        lse if lse is not None else lse_part,
        num_slots, max_seq_len, tokens_per_split, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_S=REDUCE_BLOCK_S,
        CHECK_SLOT=slot_ids is not None, HAS_LSE=lse is not None, PDL=pdl,
        num_warps=1 if head_dim <= 64 else 2, **launch,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The decode kernels' tiles (decode.py and its paged baseline share them) and the split planning.


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tile and launch parameters of the split kernel."""

    block_n: int  # tokens per tile (power of 2, >= 16)
    num_warps: int
    num_stages: int
    tma: bool = True  # load full K/V tiles through TMA descriptors where the views allow it (tma_views)
    # Launch the reduce kernel as a programmatic dependent of the split kernel (sm_90+): it is placed while
    # the last splits run and waits for their partials, so the step pays no launch gap between the two.
    pdl: bool = True

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise InvalidRequestError(f"block_n must be a power of 2 >= 16, got {self.block_n}")


# Keyed by the padded head_dim (BLOCK_D). Stages sized so that 3 programs fit an sm_90 SM's shared memory (a 4th
# stage leaves room for 2); D=128 runs 2 stages, the tile sweep's best. See docs/kernels.md.
GPU_DECODE_CONFIGS: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    32: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    64: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    128: DecodeConfig(block_n=128, num_warps=4, num_stages=2),
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=3),
}
# The interpreter: small tiles so short test sequences still cross tile and split boundaries.
CPU_DECODE_CONFIG = DecodeConfig(block_n=32, num_warps=1, num_stages=1, pdl=False)

PROGRAMS_PER_SM = 2  # equal work for ~2 programs per SM: more splits only add partials (docs/kernels.md)
MIN_TOKENS_PER_SPLIT = 128  # one tile: the best floor of the split sweeps at batch 1-8 (docs/kernels.md)
VARIED_LENGTHS = 1.25  # batch * longest > this * total tokens: the lengths vary enough to cut the longest...
MIN_SPLITS_OF_LONGEST = 4  # ...in at least this many pieces, so short requests do not wait on long ones
MAX_SPLITS = 256
MAX_GIVEN_SPLITS = 4096  # an explicit num_splits above this is refused (its partials would be mostly idle memory)
CPU_NUM_SMS = 4  # stands in for the SM count under the interpreter


def decode_config(head_dim: int, device: torch.device) -> DecodeConfig:
    if device.type != "cuda":
        return CPU_DECODE_CONFIG
    block_d = block_d_for(head_dim)
    if block_d not in GPU_DECODE_CONFIGS:
        raise InvalidRequestError(f"head_dim {head_dim} is not supported; expected at most {max(GPU_DECODE_CONFIGS)}")
    return GPU_DECODE_CONFIGS[block_d]


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_NUM_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(
    batch_size: int,
    num_kv_heads: int,
    max_len: int,
    *,
    head_dim: int,
    device: torch.device,
    total_tokens: int | None = None,
    block_n: int | None = None,
) -> int:
    """Splits per request for the decode kernels (host only; never synchronises).

    Heuristic (from split sweeps; see docs/kernels.md): give ``num_sms * PROGRAMS_PER_SM`` programs equal
    work. The work is ``total_tokens * num_kv_heads`` token-heads (``total_tokens`` = sum of the lengths;
    estimated as ``batch_size * max_len`` when not given), so ``tokens_per_split`` is the work per program,
    at least ``MIN_TOKENS_PER_SPLIT`` (on the CPU: BLOCK_N). When the lengths vary
    (``batch_size * max_len > VARIED_LENGTHS * total_tokens``) the longest request is cut in at least
    ``MIN_SPLITS_OF_LONGEST`` pieces so the short ones do not leave SMs idle. Rounded up to a multiple of
    BLOCK_N; the grid needs ``ceil(max_len / tokens_per_split)`` splits (at most ``MAX_SPLITS``) and shorter
    requests' idle programs exit at once. On 132 SMs with 8 KV heads: batch 1 at 64k tokens gets 32 splits
    (2048 tokens each), at 8k also 32 (256 each); batch 32 at 4k (256 programs) and larger batches one.
    """
    if max_len <= 0 or batch_size <= 0 or num_kv_heads <= 0:
        return 1
    block_n = block_n or decode_config(head_dim, device).block_n
    total = total_tokens if total_tokens is not None else batch_size * max_len
    floor = MIN_TOKENS_PER_SPLIT if device.type == "cuda" else block_n
    tokens_per_split = max(cdiv(max(total, 1) * num_kv_heads, num_sms(device) * PROGRAMS_PER_SM), floor)
    if batch_size * max_len > VARIED_LENGTHS * total:
        tokens_per_split = min(tokens_per_split, max(cdiv(max_len, MIN_SPLITS_OF_LONGEST), block_n))
    tokens_per_split = cdiv(tokens_per_split, block_n) * block_n
    return max(1, min(cdiv(max_len, tokens_per_split), MAX_SPLITS))


def tokens_per_split_for(length_bound: int, num_splits: int, block_n: int) -> int:
    """Tokens each split covers so that num_splits splits cover length_bound tokens (multiple of block_n)."""
    return cdiv(cdiv(max(length_bound, 1), num_splits), block_n) * block_n


def check_num_splits(num_splits: object) -> None:
    if num_splits is not None and (not is_int(num_splits) or not 1 <= num_splits <= MAX_GIVEN_SPLITS):
        raise InvalidRequestError(
            f"num_splits must be a positive int (at most {MAX_GIVEN_SPLITS}) or None, got {num_splits!r}"
        )


def plan_splits(
    num_splits: int | None,
    max_len: int | None,
    max_seq_len: int,
    length_stats: Callable[[], tuple[int, int]],
    *,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    block_n: int,
) -> tuple[int, int]:
    """(num_splits, tokens_per_split). Calls length_stats (it synchronises) only when both hints are None."""
    max_len = length_hint("max_len", max_len)
    if num_splits is None:
        total = None
        if max_len is None:
            max_len, total = length_stats()
        num_splits = choose_num_splits(
            batch,
            num_kv_heads,
            min(max_len, max_seq_len),
            head_dim=head_dim,
            device=device,
            total_tokens=total,
            block_n=block_n,
        )
    bound = max_seq_len if max_len is None else min(max_len, max_seq_len)
    return int(num_splits), tokens_per_split_for(bound, num_splits, block_n)


def use_pdl(cfg: DecodeConfig, device: torch.device, num_splits: int) -> bool:
    """Whether the split + reduce launches pair up as programmatic dependent launches (sm_90 and newer)."""
    return cfg.pdl and num_splits > 1 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None) -> tuple:
    """Float32 torch attention of one request's query q [Hq, D] over its tokens k, v [n, Hkv, D] (n > 0), the
    decode references' core: (out [Hq, D], natural-log lse [Hq])."""
    group = q.shape[0] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[1]) if sm_scale is None else sm_scale
    scores = torch.einsum("hd,nhd->hn", q.float(), k.float().repeat_interleave(group, dim=1)) * scale
    out = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v.float().repeat_interleave(group, dim=1))
    return out, torch.logsumexp(scores, dim=-1)


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """A split decode launch (decode.py, paged_decode.py): how many splits of how many tokens, where the split
    kernel writes (out and lse themselves for one split, float32 partials otherwise), the log2-domain softmax
    scale and whether the split and reduce launches pair up as programmatic dependent launches."""

    num_splits: int
    tokens_per_split: int
    o_buf: torch.Tensor
    lse_buf: torch.Tensor | None
    o_strides: tuple[int, ...]
    lse_strides: tuple[int, ...]
    scale: float
    pdl: bool

    @property
    def lse_arg(self) -> torch.Tensor:
        """The split kernel's lse pointer (o_buf where no lse is written: HAS_LSE is False then)."""
        return self.lse_buf if self.lse_buf is not None else self.o_buf

    def finish(
        self, seq_lens: torch.Tensor, slot_ids: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor | None,
        *, num_slots: int, max_seq_len: int,
    ) -> torch.Tensor:  # fmt: skip
        """Combine the partials into out (and lse) where there were several splits; returns out."""
        if self.num_splits > 1:
            reduce_splits(self.o_buf, self.lse_buf, seq_lens, slot_ids, out, lse, num_slots=num_slots,
                          max_seq_len=max_seq_len, tokens_per_split=self.tokens_per_split, pdl=self.pdl)  # fmt: skip
        return out


def plan_decode(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None, sm_scale: float | None, cfg: DecodeConfig,
    num_splits: int | None, max_len: int | None, max_seq_len: int, length_stats: Callable[[], tuple[int, int]],
    num_kv_heads: int,
) -> SplitPlan:  # fmt: skip
    """The SplitPlan of a decode launch of q [B, Hq, D] over slots of ``max_seq_len`` tokens (see plan_splits)."""
    batch, _, head_dim = q.shape
    num_splits, tokens_per_split = plan_splits(
        num_splits, max_len, max_seq_len, length_stats, batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim,
        device=q.device, block_n=cfg.block_n,
    )  # fmt: skip
    o_buf, lse_buf, o_strides, lse_strides = split_outputs(out, lse, num_splits)
    return SplitPlan(num_splits, tokens_per_split, o_buf, lse_buf, o_strides, lse_strides,
                     log2_softmax_scale(sm_scale, head_dim), use_pdl(cfg, q.device, num_splits))  # fmt: skip
