# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by the kernel launchers.

Every check raises InvalidRequestError (a ValueError) with a message that names the argument, says what was
wrong and what was expected. All checks read only tensor metadata (shape, dtype, strides, device): none
synchronises.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from vkv.allocator.errors import InvalidRequestError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)

# In-tile offsets (arange(BLOCK) * stride) are int32 inside the kernels; tile bases are int64.
MAX_IN_TILE_OFFSET = 2**31 - 1


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


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
