"""Cross-check `--kv-bits` against transformers' QuantizedCache (optimum-quanto backend) under dense.

Both quantize per token in groups of G channels with quanto's arithmetic (tests/engine/
test_quantized.py checks the codes agree to 1e-6), and both let a forward's own tokens attend in
full precision (QuantizedCache with residual_length=1 flushes every step, so everything older is
quantized, as here). One difference is by design: streambench holds keys *before* RoPE (it must
re-rotate them when it evicts), transformers after. So three runs per width, token by token over
the same text, per-token NLL compared:

  ours          StreamSession(dense, quant=KVQuant(bits, group=G))
  hf            QuantizedCache("quanto", nbits, q_group_size=G, residual_length=1): keys after RoPE
  hf-pre-rope   the same layer, keys un-rotated before quanto quantizes them and rotated back after
                it dequantizes (what ours holds): equal to float noise until the first rounding
                decision two float paths take differently (a value within ~1e-6 of a rounding
                boundary becomes the neighbouring code, a whole step); "equal until" says where

    python bench/quant_crosscheck.py --tokens 512 --group 32       (needs pip install 'streambench[quant]')
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def nll_per_token(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[0, 1:, None])[:, 0]


def rotate(k, cos, sin, sign):
    half = k.shape[-1] // 2
    turn = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * cos + sign * turn * sin


def pre_rope_layer(rotary_emb, nbits, group):
    """transformers' quanto layer holding keys before RoPE (positions 0..T-1: a dense stream)."""
    from transformers.cache_utils import QuantoQuantizedLayer

    class PreRopeLayer(QuantoQuantizedLayer):
        def _tables(self, t):
            cos, sin = rotary_emb(t, position_ids=torch.arange(t.shape[-2])[None])
            return cos[0].to(t.dtype), sin[0].to(t.dtype)

        def update(self, key_states, value_states, *args, **kwargs):
            self._keys_next = True
            return super().update(key_states, value_states, *args, **kwargs)

        def _quantize(self, tensor, axis):
            if self._keys_next:  # (update quantizes the keys first, then the values)
                self._keys_next = False
                cos, sin = self._tables(tensor)
                tensor = rotate(tensor, cos, sin, -1.0).contiguous()
                q = super()._quantize(tensor, axis)
                self._key_codes = q
                return q
            return super()._quantize(tensor, axis)

        def _dequantize(self, qtensor):
            out = super()._dequantize(qtensor)
            if qtensor is getattr(self, "_key_codes", None):
                cos, sin = self._tables(out)
                out = rotate(out, cos, sin, 1.0)
            return out

    return PreRopeLayer(nbits=nbits, q_group_size=group, residual_length=1)


@torch.no_grad()
def hf_run(model, ids, bits, group, pre_rope: bool):
    from transformers import QuantizedCache

    cache = QuantizedCache("quanto", model.config, nbits=bits, q_group_size=group, residual_length=1)
    if pre_rope:
        cache.layers = [pre_rope_layer(model.model.rotary_emb, bits, group) for _ in cache.layers]
    outs = [model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    return torch.cat(outs, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--bits", default="4,2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from streambench.engine.cache.quant import KVQuant
    from streambench.engine.session import StreamSession
    from streambench.models import loading
    from streambench.policies.build import PolicySpec, build_policy
    from streambench.tasks.texts import load_text

    lm = loading.load(loading.EMBEDDED, "cpu", "float32")
    ids = torch.tensor([lm.tokenizer(load_text()[: 12 * args.tokens])["input_ids"][: args.tokens]])
    with torch.no_grad():
        fp = nll_per_token(lm.model(input_ids=ids).logits, ids)
    print(f"SmolLM2-135M fp32, dense, {ids.shape[1]} tokens of Hamlet, token by token, group {args.group}")
    print(f"unquantized PPL {math.exp(fp.mean()):.3f}\n")
    print(
        f"{'bits':>4}  {'run':<12} {'PPL':>8}  {'max |dNLL| vs ours':>19}  {'mean |dNLL|':>11}  "
        f"{'equal until':>11}  {'s':>5}"
    )
    for bits in map(int, args.bits.split(",")):
        t0 = time.perf_counter()
        with StreamSession(lm, build_policy(PolicySpec("dense", {}), None), quant=KVQuant(bits, group=args.group)) as s:
            ours = nll_per_token(s.feed(ids, exact=True), ids)
        rows = [("ours", ours, time.perf_counter() - t0)]
        for name, pre in (("hf", False), ("hf-pre-rope", True)):
            t0 = time.perf_counter()
            rows.append(
                (name, nll_per_token(hf_run(lm.model, ids, bits, args.group, pre), ids), time.perf_counter() - t0)
            )
        for name, nll, secs in rows:
            diff = (nll - ours).abs()
            apart = (diff > 1e-4).nonzero()
            until = f"token {int(apart[0, 0]) + 1}" if len(apart) else "the end"
            print(
                f"{bits:>4}  {name:<12} {math.exp(nll.mean()):8.3f}  {diff.max():19.2e}  {diff.mean():11.2e}  "
                f"{until:>11}  {secs:5.0f}"
            )
        print()


if __name__ == "__main__":
    main()
