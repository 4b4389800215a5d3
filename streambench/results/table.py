"""The results table the CLI prints after a run or sweep: one row per run, the task's own columns
(quality first), then speed and memory. The report builds its tables from the same hooks."""

from __future__ import annotations


def format_table(results: list[dict]) -> str:
    """One row per run: policy, budget, the task's own columns, then speed and memory."""
    from tabulate import tabulate

    from streambench.engine.meter import peak_memory_mib
    from streambench.tasks import TASKS

    columns = TASKS.get(results[0]["config"]["task"]["name"]).columns_for(results)
    # eval tok/s: tokens through the model per second (a chunked stream's is throughput);
    # decode tok/s: one token per forward, the policy's speed as a decoder
    decode = any("decode_tokens_per_s" in r["metrics"] for r in results)
    headers = [
        "policy",
        "budget",
        *(h for h, _ in columns),
        "eval tok/s",
        *(["decode tok/s"] if decode else []),
        "peak mem MiB",
        "KV MiB",
    ]
    hybrid = any("kv_sliding_mib_peak" in r["metrics"] for r in results)  # per layer kind
    if hybrid:
        headers[1] = "budget (full layers)"
        headers += ["KV MiB full", "KV MiB sliding"]
    bank = any("bank_mib" in r["metrics"] for r in results)  # longmem's memory bank, beside the cache
    if bank:
        headers.append("bank MiB")
    rows = []
    for r in results:
        m = r["metrics"]
        budget = r["config"]["policy"]["args"].get("budget")
        ratio = r.get("budget_ratio")
        shown = budget if budget is not None else "all"
        if isinstance(ratio, dict) and "ratio" in ratio:
            shown = f"{shown} ({100 * ratio['ratio']:g}%)"
        rows.append(
            [
                r.get("label", r["config"]["policy"]["name"]),
                shown,
                *(m.get(key) for _, key in columns),
                m.get("tokens_per_s"),
                *([m.get("decode_tokens_per_s")] if decode else []),
                peak_memory_mib(m),
                m.get("kv_mib_peak"),
                *([m.get("kv_full_mib_peak"), m.get("kv_sliding_mib_peak")] if hybrid else []),
                *([m.get("bank_mib")] if bank else []),
            ]
        )
    # floats rounded here, not only by floatfmt: tabulate prints a column it takes for text as is
    rows = [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in rows]
    return tabulate(rows, headers=headers, floatfmt=".2f")
