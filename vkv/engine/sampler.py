# SPDX-License-Identifier: Apache-2.0
"""Next tokens from a step's logits: greedy, or temperature / top-k / top-p sampling with a per-request seed."""

from __future__ import annotations

import torch

from .request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token per row of ``logits`` ([N, vocab], float32), row i for ``requests[i]``.

    Greedy rows take the argmax (all at once). A sampled row draws from softmax(logits / temperature) restricted
    to the top_k tokens and to the smallest set whose probability reaches top_p, with the request's own
    generator: seeded from ``params.seed`` at its first sample (else from torch's global generator), so a
    seeded request draws the same tokens whatever else is in its batch."""
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if len(greedy) == len(requests):
        return logits.argmax(-1).tolist()
    picked = logits.argmax(-1)  # every row; the sampled rows' are replaced below
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    picked[drawn] = torch.stack([_draw(logits[i], requests[i]) for i in drawn])
    return picked.tolist()  # one wait for the device, whatever the number of sampled rows


def _draw(row: torch.Tensor, request: Request) -> torch.Tensor:
    """One token id for ``request`` from its row, as a 0-d tensor on the row's device (read with the others')."""
    params = request.params
    if request.generator is None:
        request.generator = torch.Generator(device=row.device)
        if params.seed is not None:
            request.generator.manual_seed(params.seed)
        else:
            request.generator.seed()
    row = row.float() / params.temperature
    if 0 < params.top_k < row.numel():
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=request.generator)[0]
