"""GPU check for the core engine, for a machine with one CUDA GPU and no network.

1. Exactness on CUDA: the engine equals the rebuilt-DynamicCache reference (tests/reference.py)
   on a 3-layer random model in fp32, and a fresh forward over the kept tokens on a 1-layer
   model in bf16, after hundreds of evictions.
2. Speed and memory per policy, through `streambench.runner.run`, for random-weight models of
   real shapes in bf16: SmolLM2-135M (the embedded model's config, its real tokenizer, Hamlet)
   and Llama-2-7B. Perplexities of random weights mean nothing; tokens/s, CUDA/NVML memory and
   KV bytes do.

    python bench/gpu_check.py --tokenizer DIR [--out DIR]
DIR holds the embedded model's tokenizer files and config.json (the converted model folder in
~/.cache/streambench/models/ has them).
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

from streambench.cli import format_table  # noqa: E402
from streambench.config import PolicySpec, RunConfig, build_policy  # noqa: E402
from streambench.models import LoadedModel  # noqa: E402
from streambench.runner import run  # noqa: E402
from streambench.session import StreamSession  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0)


def exactness(device) -> dict:
    out = {}
    cases = [("window", {}), ("streamingllm", {}), ("sirllm", {"recent_size": 3})]
    ids = torch.randint(3, 96, (1, 300), generator=torch.Generator().manual_seed(0)).to(device)
    for name, args in cases:
        model = tiny_model("llama", layers=3).to(device)
        session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16))
        worst = 0.0
        with ReferenceStream(model, build_policy(PolicySpec(name, args), 16)) as ref, torch.no_grad():
            for t in range(ids.shape[1]):
                a, b = session.feed(ids[:, t : t + 1]), ref.feed(ids[:, t : t + 1])
                worst = max(worst, (a - b).abs().max().item())
        out[f"deep-fp32-{name}"] = worst
        model = tiny_model("llama", layers=1, dtype=torch.bfloat16).to(device)
        session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), 16))
        with torch.no_grad():
            for t in range(ids.shape[1]):
                last = session.feed(ids[:, t : t + 1])[0, -1]
            fresh = model(input_ids=ids[:, torch.as_tensor(session.cache.positions, device=device)]).logits[0, -1]
        out[f"one-layer-bf16-{name}"] = (last.float() - fresh.float()).abs().max().item()
    return out


def random_model(config, tokenizer, name, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return LoadedModel.wrap(model, tokenizer, name=name, source="random weights, real shape")


def speed(lm, policies, tokens, budget, out_dir) -> list[dict]:
    specs = [PolicySpec(p) for p in policies]
    config = RunConfig(model=lm.info.name, budget=budget, policies=specs, task="perplexity",
                       task_args={"tokens": tokens}, out=str(out_dir))
    return list(run(config, lm=lm))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    parser.add_argument("--only", default=None, help="run only this model shape (e.g. llama2-7b-shape)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    report = {"device": name, "torch": torch.__version__}
    t0 = time.time()
    if not args.only:
        report["exactness_max_abs_logit_diff"] = exactness(device)
        print(json.dumps(report["exactness_max_abs_logit_diff"], indent=1), f"({time.time() - t0:.0f}s)", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    smol = json.loads((Path(args.tokenizer) / "config.json").read_text())
    smol = {k: smol[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                 "tie_word_embeddings", "rms_norm_eps") if k in smol} | {"rope_theta": 100000.0}
    out = Path(args.out)
    plan = [
        ("smollm2-135m-shape", smol, ["dense", "window", "recompute-window", "streamingllm", "sirllm"], 2048, 256),
        # the embedded tokenizer's 49,152-token vocabulary replaces Llama-2's 32,000
        ("llama2-7b-shape", LLAMA2_7B | {"vocab_size": len(tokenizer)}, ["dense", "window", "streamingllm", "sirllm"], 1024, 512),
    ]
    if args.only:
        plan = [p for p in plan if p[0] == args.only]
    if args.quick:
        plan = [(label, config, policies, 48, 16) for label, config, policies, _, _ in plan[:1]]
    for label, config, policies, tokens, budget in plan:
        t0 = time.time()
        lm = random_model(config, tokenizer, label, device)
        speed(lm, ["window"], 64, 16, out / "warmup")  # first CUDA calls (cuBLAS, allocator) untimed
        results = speed(lm, policies, tokens, budget, out / label)
        print(f"\n{label} (bf16, random weights), {tokens} tokens, budget {budget}  ({time.time() - t0:.0f}s)")
        print(format_table(results), flush=True)
        report[label] = [{"policy": r["label"], **{k: r["metrics"].get(k) for k in (
            "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "cuda_peak_mib", "nvml_used_peak_mib",
            "kv_mib_peak", "kv_allocated_mib")}} for r in results]
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
