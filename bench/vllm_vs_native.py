"""Rollout throughput: the vLLM backend (VLLMEngine, in-process vLLM) against the native engine.

Same model, same prompts, same sampling settings on both sides: a random-init ~40.5 M Qwen2
(cpu-platform.md's "40 M" shape: hidden 512, 8 layers, MLP 1536, 8 heads / 2 KV heads, vocab
32000, tied embeddings; fp32), random 32-token prompts, ``--max-new-tokens`` (256) new tokens at
temperature 1 with no EOS (``eos_token_ids=[]``, so every response has exactly that length).
Each engine is warmed up once (vLLM's start is timed separately), then the two are timed
``--repeats`` times, alternating; the median is reported. Both run in this process with
``--threads`` torch threads (the in-process vLLM engine uses torch's thread count)::

    ratio = vLLM tok/s / native tok/s        (> 1: vLLM is faster)

The time of one ``update_weights`` (pushing the 40 M parameters into vLLM) is printed too.

Usage::

    .venv-engines/bin/python bench/vllm_vs_native.py                 # batch 8 and 32, 256 tokens
    .venv-engines/bin/python bench/vllm_vs_native.py --batch 8 --max-new-tokens 64 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def random_qwen2_40m(seed: int = 0):
    """The ~40.5 M-param Qwen2 of cpu-platform.md (h512, L8, inter 1536, 8/2 heads, vocab 32000)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine
    from rlspec.rollout.vllm_engine import VLLMEngine

    model = random_qwen2_40m(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    native = NativeEngine(model, [], max_batch_size=max(args.batch))
    vllm = VLLMEngine(model, None, [], max_batch_size=max(args.batch), settings={"dtype": "float32"},
                      max_len_hint=args.prompt_len + args.max_new_tokens)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(max(args.batch))]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)

    t0 = time.perf_counter()
    vllm.start()
    print(f"model: random Qwen2, {n_params / 1e6:.1f} M params, fp32; {args.threads} torch threads")
    print(f"vLLM engine start: {time.perf_counter() - t0:.1f} s (save_pretrained + LLM init, vLLM imported)")
    warm = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1)
    native.generate(prompts[:8], warm)
    vllm.generate(prompts[:8], warm)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # a no-op "optimizer step"
    vllm.update_weights()
    print(f"vLLM update_weights (all {n_params / 1e6:.1f} M params): {vllm.last_weight_sync_seconds * 1e3:.0f} ms")

    rows = []
    try:
        for batch in args.batch:
            rates: dict[str, list[float]] = {"native": [], "vllm": []}
            for _ in range(args.repeats):
                for name, engine in (("native", native), ("vllm", vllm)):
                    res = engine.generate(prompts[:batch], params)
                    assert res.stats["tokens"] == batch * args.max_new_tokens, res.stats
                    rates[name].append(res.stats["tokens_per_s"])
            nat, vl = statistics.median(rates["native"]), statistics.median(rates["vllm"])
            rows.append((batch, nat, vl, vl / nat))
            print(f"  batch {batch}: native {rates['native']}, vllm {rates['vllm']}", flush=True)
    finally:
        vllm.close()
    print(f"\n{args.max_new_tokens} new tokens, T=1, no EOS, median of {args.repeats}:")
    print("| batch | native tok/s | vLLM tok/s | ratio vLLM / native |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, nat, vl, ratio in rows:
        print(f"| {batch} | {nat:.0f} | {vl:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
