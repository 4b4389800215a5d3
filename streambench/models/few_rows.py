"""Linear layers for forwards of a few rows on a CPU: a batch of one-token steps (a group of
policies over one stream, batched texts, a dialogue batch's short forwards).

`F.linear` computes x @ W^T. For 2 to ~32 rows this project's CPU GEMM (torch 2.13, MKL/oneDNN,
2-core AMD EPYC, fp32) runs that layout 1.4-2.5x slower than the same product as W @ x^T
(`python bench/few_rows_linear.py`: SmolLM2-135M's 211 weights, 5 rows 110.7 against 63.3 ms),
so a batch of five one-token forwards cost ~2x one, where reading the weights once should cost
about the same. A batched session therefore gives the model's `nn.Linear` modules the class
`FewRowsLinear` (`install`) and runs its forwards inside `few_rows_linears`: W @ x^T from 2 to
`MAX_ROWS` rows there, `F.linear` otherwise and outside, so a stream alone computes bit for bit
as before. The two are the same sums in another order: a batch's results move by float rounding,
as they already did with the batch's own kernels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MAX_ROWS = 32  # beyond ~32 rows the two layouts cost the same (a compute-bound GEMM)


_active = False  # inside `few_rows_linears`


class FewRowsLinear(torch.nn.Linear):
    """`nn.Linear` whose forward takes W @ x^T for 2..MAX_ROWS rows inside `few_rows_linears`,
    and is nn.Linear's own (`F.linear`) everywhere else: a model's linears keep this class once a
    batched session has swapped it in (one class assignment per module, not per forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if not 2 <= rows <= MAX_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, width).t()
        if self.bias is None:
            out = torch.mm(self.weight, flat)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, flat)
        return out.t().contiguous().view(*x.shape[:-1], self.weight.shape[0])


def install(model: torch.nn.Module) -> bool:
    """Give the model's plain fp32 `nn.Linear` modules on a CPU the class FewRowsLinear (exactly
    that class: a quantized or otherwise specialised linear keeps its own forward); whether any
    has it. Off the CPU nothing changes: a GPU's GEMM has no such gap."""
    found = False
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            if module.weight.dtype == torch.float32:
                module.__class__ = FewRowsLinear
        found |= type(module) is FewRowsLinear
    return found


@contextmanager
def few_rows_linears(on: bool) -> Iterator[None]:
    """Inside the block (where `on`), installed linears take W @ x^T for a few rows."""
    global _active
    before = _active
    _active = on or before
    try:
        yield
    finally:
        _active = before
