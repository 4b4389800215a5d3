"""Linear layers for forwards of a few rows on a CPU: a batch of one-token steps (a group of
policies over one stream, batched texts, a dialogue batch's short forwards), and the one-token
steps of a stream alone.

`F.linear` computes x @ W^T. For 2 to ~32 rows this project's CPU GEMM (torch 2.13, MKL/oneDNN,
2-core AMD EPYC, fp32) runs that layout 1.4-2.5x slower than the same product as W @ x^T
(`python bench/few_rows_linear.py`: SmolLM2-135M's 211 weights, 5 rows 110.7 against 63.3 ms),
so a batch of five one-token forwards cost ~2x one, where reading the weights once should cost
about the same. A batched session therefore gives the model's `nn.Linear` modules the class
`FewRowsLinear` (`install`) and runs its forwards inside `few_rows_linears("few")`: W @ x^T from
2 to `MAX_ROWS` rows there, `F.linear` otherwise and outside. The two are the same sums in
another order: a batch's results move by float rounding, as they do with the batch's own kernels.

Exact steps (`"exact"`, a group; `"one"`, a stream alone): a GEMM's result for one column depends
on how many columns share the call and where it sits (its kernels tile them), so a stream's
logits in a batch differ from its logits alone in the last bits, and a policy choosing between
near-tied scores (knorm's key norms) can keep another token. But a product of 2 or 3 columns
(W @ X^T, X's rows contiguous) computes each column alike wherever it sits and whatever its
neighbours, on this CPU; `install` proves that per weight shape (`_proven`). So a group's step
takes its rows three at a time and a stream alone takes its one row beside a zero row: every
stream's products are then the same bits grouped as alone (tests/engine/test_grouped.py), at
the cost of one 2-3 column product per three streams (~ one GEMV each: 10-12 ms against 13 for
the model's 211 weights). Where the proof fails (another CPU's kernels), nothing is exact and
`exact_steps` says so: groups fall back to float-close results, batch-sensitive policies run
alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MAX_ROWS = 32  # beyond ~32 rows the two layouts cost the same (a compute-bound GEMM)
BLOCK = 3  # columns per product in exact steps (the widths this CPU's GEMM computes alike: 2, 3)
EXACT_ROWS = 16  # a group's streams (grouping.GROUP_LIMIT): exact steps beyond take `few`

_mode: str | None = None  # inside `few_rows_linears`: "few", "exact" or "one"
_proven: dict[tuple, bool] = {}  # (out, in, bias, threads) -> whether 2-3 column products are exact


class FewRowsLinear(torch.nn.Linear):
    """`nn.Linear` whose forward takes W @ x^T for a few rows inside `few_rows_linears`, and is
    nn.Linear's own (`F.linear`) everywhere else: a model's linears keep this class once a session
    has swapped it in (one class assignment per module, not per forward)."""

    exact = False  # set by `install`: this weight's 2-3 column products proven exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = _mode
        if mode is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if self.exact and (rows == 1 if mode == "one" else mode == "exact" and 1 <= rows <= EXACT_ROWS):
            return _blocks(x.reshape(rows, width), self.weight, self.bias).view(*x.shape[:-1], -1)
        if mode == "one" or not 2 <= rows <= MAX_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return _product(x.reshape(rows, width), self.weight, self.bias).view(*x.shape[:-1], -1)


def _product(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, out) as W @ flat^T, flat's rows contiguous."""
    if bias is None:
        out = torch.mm(weight, flat.t())
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous()


def _blocks(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, out): each row's product in a block of 2-3 (a lone row beside a zero row)."""
    rows = flat.shape[0]
    if rows == 1 or rows % BLOCK == 1:  # (the last block would hold one row)
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    if flat.shape[0] <= BLOCK:
        return _product(flat, weight, bias)[:rows]
    parts = [_product(flat[s : s + BLOCK], weight, bias) for s in range(0, flat.shape[0], BLOCK)]
    return torch.cat(parts)[:rows]


def _exact_here(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this CPU's GEMM gives one column the same bits in every slot of a 2- or 3-column
    product, beside any neighbours (random ones, fixed seed), as beside a zero row."""
    key = (*weight.shape, bias is not None, torch.get_num_threads())
    if key not in _proven:
        gen = torch.Generator().manual_seed(0)
        width = weight.shape[1]
        x = torch.randn(1, width, generator=gen)
        with torch.no_grad():
            want = _product(torch.cat([x, x.new_zeros(1, width)]), weight, bias)[0]
            ok = True
            for size in (2, BLOCK):
                for slot in range(size):
                    flat = torch.randn(size, width, generator=gen)
                    flat[slot] = x[0]
                    ok = ok and torch.equal(_product(flat, weight, bias)[slot], want)
        _proven[key] = ok
    return _proven[key]


def install(model: torch.nn.Module) -> bool:
    """Give the model's plain fp32 `nn.Linear` modules on a CPU the class FewRowsLinear (exactly
    that class: a quantized or otherwise specialised linear keeps its own forward), proving each
    weight's exact steps; whether any has the class. Off the CPU nothing changes: a GPU's GEMM has
    no such gap."""
    found = False
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            if module.weight.dtype == torch.float32:
                module.__class__ = FewRowsLinear
        if type(module) is FewRowsLinear:
            found = True
            module.exact = _exact_here(module.weight.detach(), None if module.bias is None else module.bias.detach())
    return found


def exact_steps(model: torch.nn.Module) -> bool:
    """Whether a group's one-token steps give each stream its products alone, bit for bit: every
    linear installed and proven (a model on a CPU in fp32 whose GEMM passed `_exact_here`)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return bool(linears) and all(type(m) is FewRowsLinear and m.exact for m in linears)


def exact_products_here() -> bool:
    """Before a model loads (a plan): whether this process's CPU GEMM computes exact steps, on
    two typical shapes (a model's own weights are proven again when it loads)."""
    gen = torch.Generator().manual_seed(1)
    return all(_exact_here(torch.randn(o, i, generator=gen), None) for o, i in ((576, 576), (1536, 576)))


@contextmanager
def few_rows_linears(mode: str | None) -> Iterator[None]:
    """Inside the block installed linears take W @ x^T for a few rows ("few"), the exact steps of a
    group ("exact") or of a stream alone ("one"); None changes nothing (an outer block's mode holds:
    an inner session alone inside a batched one's block)."""
    global _mode
    before = _mode
    _mode = mode or before
    try:
        yield
    finally:
        _mode = before
