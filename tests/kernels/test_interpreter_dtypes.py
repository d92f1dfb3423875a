# SPDX-License-Identifier: Apache-2.0
"""Issue 12 #17: Triton's interpreter computes tl.dot over bfloat16 wrongly (|out| ~8e8 for |V| ~4, no error),
so the attention launchers refuse bfloat16 there; float16 and float32 still match the references."""

import pytest
import torch

from vkv import InvalidRequestError
from vkv.kernels import (
    decode_attention,
    decode_attention_reference,
    extend_attention,
    extend_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
)

from .conftest import ON_GPU


def _decode(dtype, device):
    q = torch.randn(2, 4, 64, device=device).to(dtype)
    k = (4 * torch.randn(3, 80, 2, 64, device=device)).to(dtype)
    v = (4 * torch.randn_like(k, dtype=torch.float32)).to(dtype)
    slots, lens = (torch.tensor(x, dtype=torch.int32, device=device) for x in ([2, 0], [70, 9]))
    return decode_attention(q, k, v, slots, lens, num_splits=2), decode_attention_reference(q, k, v, slots, lens)[0]


def _extend(dtype, device):
    q = torch.randn(5, 4, 64, device=device).to(dtype)
    k = (4 * torch.randn(3, 80, 2, 64, device=device)).to(dtype)
    v = (4 * torch.randn_like(k, dtype=torch.float32)).to(dtype)
    slots, cu, lens = (torch.tensor(x, dtype=torch.int32, device=device) for x in ([1, 2], [0, 2, 5], [40, 3]))
    out = extend_attention(q, k, v, slots, cu, lens)
    return out, extend_attention_reference(q, k, v, slots, cu, lens)


def _paged(dtype, device):
    q = torch.randn(2, 4, 64, device=device).to(dtype)
    k = (4 * torch.randn(8, 16, 2, 64, device=device)).to(dtype)
    v = (4 * torch.randn_like(k, dtype=torch.float32)).to(dtype)
    table = torch.randperm(8, device=device).to(torch.int32).view(2, 4)
    lens = torch.tensor([50, 7], dtype=torch.int32, device=device)
    return paged_decode_attention(q, k, v, table, lens), paged_decode_attention_reference(q, k, v, table, lens)[0]


LAUNCHERS = {"decode": _decode, "extend": _extend, "paged": _paged}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_float16_and_float32_match_the_reference(launcher, dtype, device, assert_close):
    out, ref = LAUNCHERS[launcher](dtype, device)
    assert_close(out, ref, dtype)


@pytest.mark.skipif(ON_GPU, reason="the kernels are compiled for the GPU here, where bfloat16 is right")
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_bfloat16_is_refused_under_the_interpreter(launcher, device):
    with pytest.raises(InvalidRequestError, match=r"bfloat16 attention cannot run under Triton's interpreter .* "
                       r"expected float16 or float32 on the CPU"):  # fmt: skip
        LAUNCHERS[launcher](torch.bfloat16, device)
