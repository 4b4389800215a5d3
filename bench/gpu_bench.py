"""GPU benchmark, for a machine with one CUDA GPU (H100/H200) and no network. One command:

    python bench/gpu_bench.py OUT_DIR [--tokenizer DIR] [--models smollm2,llama2-7b,llama3-8b]

1. Exactness on CUDA: the engine equals the rebuilt-DynamicCache reference (tests/reference.py)
   on a 3-layer random model in fp32, a fresh forward over the kept tokens on a 1-layer bf16 model
   after hundreds of evictions, and batched streams equal single ones.
2. For each model, the tables of `streambench bench` (weight-streaming bound, plain decode and
   generate, each policy, batched streams, streamingllm over recompute-window at 256..4K) and a
   memory table per policy (CUDA allocator peak, NVML, exact KV bytes). Models: the embedded
   SmolLM2-135M when it is installed (else a random-weight model of its shape), and random-weight
   Llama-2-7B and Llama-3-8B shapes in bf16: real sizes, no downloads. Random weights make
   perplexity meaningless; time and memory are what they would be. Then, per content-aware
   policy, evictions chosen on the device against the host path (ms per token, the host syncs a
   device step makes, logit gap).

Everything lands in OUT_DIR (gpu_bench.json, gpu_bench.txt), rewritten after each model, so a run
cut short keeps what it measured. Targets 8 minutes on an H100; --deadline skips what is left.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference import ReferenceStream  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from streambench.engine.meter import _Nvml  # noqa: E402
from streambench.engine.session import StreamSession  # noqa: E402
from streambench.models.loading import LoadedModel  # noqa: E402
from streambench.policies.build import PolicySpec, build_policy  # noqa: E402
from streambench.runs.speed import exact_vs_token, format_bench, random_ids, run_bench  # noqa: E402

SHAPES = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
POLICIES = ["dense", "window", "streamingllm", "sirllm", "h2o", "tova", "knorm", "snapkv", "random"]


def exactness(device) -> dict:
    out = {}
    cases = [("window", {}), ("streamingllm", {}), ("sirllm", {"recent_size": 3})]
    ids = torch.randint(3, 96, (3, 160), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        for name, args in cases:
            model = tiny_model("llama", layers=3).to(device)
            session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16))
            worst = 0.0
            with ReferenceStream(model, build_policy(PolicySpec(name, args), 16)) as ref:
                for t in range(ids.shape[1]):
                    a, b = session.feed(ids[:1, t : t + 1]), ref.feed(ids[:1, t : t + 1])
                    worst = max(worst, (a - b).abs().max().item())
            out[f"deep-fp32-{name}"] = worst
            batched = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16), batch_size=3)
            singles = [
                StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16)) for _ in range(3)
            ]
            worst = 0.0
            for t in range(ids.shape[1]):
                many = batched.feed(ids[:, t : t + 1])
                for b, single in enumerate(singles):
                    worst = max(worst, (many[b] - single.feed(ids[b : b + 1, t : t + 1])[0]).abs().max().item())
            out[f"batched-vs-single-fp32-{name}"] = worst
            model = tiny_model("llama", layers=1, dtype=torch.bfloat16).to(device)
            session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16))
            for t in range(ids.shape[1]):
                last = session.feed(ids[:1, t : t + 1])[0, -1]
            fresh = model(input_ids=ids[:1, torch.as_tensor(session.cache.positions, device=device)]).logits[0, -1]
            out[f"one-layer-bf16-{name}"] = (last.float() - fresh.float()).abs().max().item()
    return out


DEVICE_POLICIES = ["h2o", "tova", "knorm", "snapkv", "sirllm", "streamingllm", "window"]
try:  # (a press that steps on the device, when kvpress is installed: ./install.sh kvpress)
    import kvpress  # noqa: F401

    DEVICE_POLICIES.append("kvpress:KeyDiffPress")
except ImportError:
    pass


@torch.no_grad()
def device_steps(lm, budget: int, steps: int, burn: int, device) -> list[dict]:
    """Evictions chosen on the device against the host path (issue 29, item 4), per policy at a
    full cache: ms per token each way (eager forwards), the host syncs a device step made
    (the dispatch-mode counter; on CUDA also `torch.cuda.set_sync_debug_mode("error")`), and the
    largest logit gap between the two paths over the timed tokens."""
    from streambench.engine.host_sync import HostSyncCounter
    from streambench.runs.speed import _timed

    need = budget + burn + 2 * steps + 8
    ids = random_ids(lm, (1, need), 0, device)
    rows = []
    for name in DEVICE_POLICIES:
        row: dict = {"policy": name, "budget": budget}
        logits = {}
        for on in (False, True):
            policy = build_policy(PolicySpec(name), budget)
            with StreamSession(lm, policy, device_steps=on) as session:
                session.feed(ids[:, :budget])
                at = budget
                outs = [session.feed(ids[:, at + i : at + i + 1]) for i in range(4)]
                logits[on] = torch.cat(outs, 1).float()
                at += 4
                if on:
                    row["device_steps"] = session.device_steps
                    with HostSyncCounter() as syncs:
                        for i in range(2):
                            session.feed(ids[:, at + i : at + i + 1])
                    row["counted_syncs"] = syncs.count
                    at += 2
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            session.feed(ids[:, at : at + 1])
                            row["cuda_sync_debug"] = "no sync"
                        except RuntimeError as e:
                            row["cuda_sync_debug"] = str(e).splitlines()[0][:120]
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                    at += 1
                start = at
                ms = 1000 * _timed(lambda i, s=session, a=start: s.feed(ids[:, a + i : a + i + 1]), steps, burn, device)
                row["device_ms" if on else "host_ms"] = ms
        row["ratio"] = row["device_ms"] / row["host_ms"]
        row["max_abs_logit_diff"] = (logits[True] - logits[False]).abs().max().item()
        rows.append(row)
    # a sweep's group: one stream to several policies as one batch (snapkv left out: its interval
    # makes its stream drop at other times, which takes the host's ragged path)
    names = ["h2o", "tova", "knorm", "sirllm", "streamingllm"]
    row = {"policy": "group of " + ",".join(names), "budget": budget}
    logits = {}
    for on in (False, True):
        group = [build_policy(PolicySpec(n), budget) for n in names]
        many = ids.expand(len(group), -1)
        with StreamSession(lm, group[0], group=group, device_steps=on) as session:
            session.feed(many[:, :budget])
            logits[on] = torch.cat([session.feed(many[:, budget + i : budget + i + 1]) for i in range(4)], 1).float()
            at = budget + 4
            if on:
                row["device_steps"] = session.device_steps
                with HostSyncCounter() as syncs:
                    session.feed(many[:, at : at + 1])
                row["counted_syncs"] = syncs.count
            at += 1
            ms = 1000 * _timed(lambda i, s=session, a=at, m=many: s.feed(m[:, a + i : a + i + 1]), steps, burn, device)
            row["device_ms" if on else "host_ms"] = ms
    row["ratio"] = row["device_ms"] / row["host_ms"]
    row["max_abs_logit_diff"] = (logits[True] - logits[False]).abs().max().item()
    rows.append(row)
    return rows


def build(name: str, device, tokenizer_dir: str | None) -> LoadedModel:
    if name == "smollm2":
        try:
            from streambench.models import loading as models

            return models.load(models.EMBEDDED, device=str(device), dtype="bfloat16")
        except Exception as exc:  # the embedded package is not installed here: its shape, random weights
            print(f"embedded model unavailable ({exc}); using random weights of its shape", flush=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise 8B fp32 weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    finally:
        torch.set_default_dtype(default)
    model.config._attn_implementation = "sdpa"
    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LoadedModel.wrap(model.eval(), tokenizer, name=f"{name}-shape", source="random weights, real shape")


@torch.no_grad()
def memory(lm, policies, budget: int, tokens: int, device) -> list[dict]:
    """Per policy: CUDA allocator peak and NVML while streaming `tokens` tokens (chunks of 64)."""
    nvml, rows = _Nvml(device), []
    ids = random_ids(lm, (1, tokens), 1, device)
    for name in policies:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        session = StreamSession(lm, build_policy(PolicySpec(name), budget))
        nvml_peak = 0
        for start in range(0, tokens, 64):
            session.feed(ids[:, start : start + 64])
            nvml_peak = max(nvml_peak, nvml.used() or 0)
        torch.cuda.synchronize(device)
        rows.append(
            {
                "policy": name,
                "budget": session.policy.budget,
                "tokens": tokens,
                "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "nvml_used_peak_mib": nvml_peak / 2**20,
                "kv_mib": session.kv_bytes / 2**20,
                "kv_allocated_mib": session.allocated_kv_bytes / 2**20,
            }
        )
        del session
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (optional; attached to random models)")
    parser.add_argument("--models", default="smollm2,llama2-7b,llama3-8b")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--budgets", default="256,512,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--exact-budgets", default="256,1024", help="exact chunked vs token by token ('' to skip)")
    parser.add_argument("--exact-tokens", type=int, default=8192)
    parser.add_argument("--deadline", type=float, default=460, help="seconds; later models are skipped")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = parser.parse_args()
    t_start = time.time()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": gpu, "torch": torch.__version__, "models": {}}
    text = [f"torch {torch.__version__}, {gpu}"]

    def save():
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_bench.txt").write_text("\n".join(text) + "\n")

    def say(line: str):
        print(line, flush=True)
        text.append(line)

    report["exactness_max_abs_logit_diff"] = exactness(device)
    say(json.dumps(report["exactness_max_abs_logit_diff"], indent=1) + f"\n({time.time() - t_start:.0f}s)")
    save()
    budgets = [int(b) for b in args.budgets.split(",")]
    budget, steps, burn, batches = args.budget, args.steps, 4, (1, 4, 8)
    exact_budgets, exact_tokens = [int(b) for b in args.exact_budgets.split(",") if b.strip()], args.exact_tokens
    if args.quick:
        budgets, budget, steps, burn, batches = [16, 32], 16, 3, 1, (1, 2)
        exact_budgets, exact_tokens = [16, 32], 128
    from tabulate import tabulate

    for name in args.models.split(","):
        if time.time() - t_start > args.deadline:
            say(f"\n{name}: skipped (past the {args.deadline:.0f} s deadline)")
            continue
        t0 = time.time()
        if args.quick:
            lm = LoadedModel.wrap(tiny_model("llama", layers=2).to(device))
        else:
            lm = build(name, device, args.tokenizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bench = run_bench(lm, POLICIES, budget, budgets, steps, burn, batches)
        if exact_budgets:
            bench["exact"] = exact_vs_token(lm, exact_budgets, exact_tokens, steps)
        entry_steps = device_steps(lm, budget, steps, burn, device)
        entry = {
            "bench": bench,
            "dtype": str(next(lm.model.parameters()).dtype),
            "parameters": sum(p.numel() for p in lm.model.parameters()),
        }
        say(f"\n== {lm.info.name} ({entry['parameters'] / 1e9:.2f}B parameters) ==")
        say(format_bench(bench, lm.info.name, entry["dtype"]))
        entry["device_steps"] = entry_steps
        say(
            "\nevictions on the device vs on the host (eager, ms per token at a full cache):\n"
            + tabulate(
                [
                    [
                        r["policy"],
                        r["device_steps"],
                        r["host_ms"],
                        r["device_ms"],
                        r["ratio"],
                        r["counted_syncs"],
                        r.get("cuda_sync_debug", "-"),
                        r["max_abs_logit_diff"],
                    ]
                    for r in entry_steps
                ],
                headers=[
                    "policy",
                    "on device",
                    "host ms",
                    "device ms",
                    "device/host",
                    "syncs",
                    "CUDA sync check",
                    "max |d logit|",
                ],
                floatfmt=".3g",
            )
        )
        if device.type == "cuda":
            entry["bench_cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            entry["memory"] = memory(lm, POLICIES, budget, 2 * budget if not args.quick else 64, device)
            say(
                "\nmemory while streaming "
                + str(entry["memory"][0]["tokens"])
                + " tokens:\n"
                + tabulate(
                    [
                        [
                            r["policy"],
                            r["budget"] or "all",
                            r["cuda_peak_mib"],
                            r["nvml_used_peak_mib"],
                            r["kv_mib"],
                            r["kv_allocated_mib"],
                        ]
                        for r in entry["memory"]
                    ],
                    headers=["policy", "budget", "CUDA peak MiB", "NVML used MiB", "KV MiB", "KV allocated MiB"],
                    floatfmt=".1f",
                )
            )
        entry["seconds"] = time.time() - t0
        say(f"({entry['seconds']:.0f}s)")
        report["models"][lm.info.name] = entry
        save()
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.time() - t_start
    save()


if __name__ == "__main__":
    main()
