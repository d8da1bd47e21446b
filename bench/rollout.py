"""Rollout throughput: rlspec's NativeEngine against HF ``model.generate`` on the same model.

Both sides get the same model, the same prompts (HF gets them left-padded), the same sampling
settings (``--temperature``, ``--top-p``, top-k off) and the same ``--max-new-tokens``; EOS stops a
response on both sides unless ``--ignore-eos``. Each side is warmed up once, then both are timed
``--repeats`` times (alternating). Throughput = generated tokens (up to and including EOS, no
padding) / wall seconds, summed over the batch; the median over repeats is reported. Printed per batch size::

    ratio = native tok/s / generate tok/s        (> 1: the native engine is faster)

With ``--floor`` each batch size also gets the *matmul floor* of a decode step: the model's linear
layers (LM head included) applied once to ``batch`` rows, nothing else (no attention, sampling or
bookkeeping), timed alone. ``batch / floor`` is the tok/s no engine can beat on this machine without
changing the weights' precision or the arithmetic; ``floor tok/s / generate tok/s`` is the best
ratio any engine could reach against ``model.generate`` (issue 19.6).

Usage::

    python bench/rollout.py                                   # embedded default model (built on first use)
    python bench/rollout.py --random-tiny --batch 8 32 128    # random ~4.2 M Qwen2 (cpu-platform.md §3)
    python bench/rollout.py --model PATH --ignore-eos         # any save_pretrained causal LM dir
    python bench/rollout.py --model smollm2 --batch 8 32 --floor   # + the matmul floor per batch size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Setup:
    model: torch.nn.Module
    name: str
    eos_ids: list[int]
    pad_id: int
    tokenizer: object | None
    chat_prompts: list[list[int]] | None  # None: random token prompts


def random_tiny_qwen2(seed: int = 0):
    """The ~4.2 M-param Qwen2 shape of cpu-platform.md §3 with random weights (vocab 940)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=940, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def chat_prompts(tokenizer, n: int) -> list[list[int]] | None:
    """Chat-templated math prompts from rlspec.tasks (None if that module is unavailable)."""
    try:
        from rlspec import tasks
    except ImportError:
        return None
    _, test = tasks.make_splits(seed=0, n_train=0, n_test=min(n, 256))
    out = []
    for p in test:
        text = tokenizer.apply_chat_template(tasks.format_prompt_messages(p), tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def load(args) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlspec.models import eos_token_ids as default_eos_token_ids

    if args.random_tiny:
        model = random_tiny_qwen2(args.seed)
        return Setup(model, "random tiny Qwen2 (cpu-platform.md §3)", [2], 0, None, None)
    path = args.model
    if path is not None:  # embedded | smollm2 | a .gguf file (dequantized once) | an HF dir
        from _models import resolve_bench_model_dir

        path = str(resolve_bench_model_dir(path))
    else:
        try:
            from rlspec.embedded import get_embedded_model_path
        except ImportError as err:
            sys.exit(f"the embedded default model is not available ({err}); pass --model PATH or --random-tiny")
        print("loading the embedded default model (built and cached on first use; this can take minutes)")
        path = str(get_embedded_model_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = default_eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    prompts = chat_prompts(tokenizer, 256) if tokenizer.chat_template else None
    return Setup(model, path, eos, pad, tokenizer, prompts)


def make_prompts(setup: Setup, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    if setup.chat_prompts:
        return [setup.chat_prompts[i % len(setup.chat_prompts)] for i in range(batch)]
    vocab = setup.model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def hf_generate(setup: Setup, prompts, max_new: int, temperature: float, top_p: float, ignore_eos: bool, seed: int):
    """HF generate on left-padded prompts; returns (generated tokens up to EOS, seconds)."""
    model = setup.model
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[setup.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen_cfg = model.generation_config
    saved = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = None if ignore_eos else setup.eos_ids
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new, pad_token_id=setup.pad_id, top_k=0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    torch.manual_seed(seed)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        gen_cfg.eos_token_id = saved
    tokens = 0
    eos = set() if ignore_eos else set(setup.eos_ids)
    for row in out[:, width:].tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        tokens += n
    return tokens, seconds


def matmul_floor_seconds(model: torch.nn.Module, batch: int, repeats: int = 20) -> float:
    """Median seconds of one decode step's matmuls: every ``nn.Linear`` of ``model`` (the LM head
    too) applied once to ``batch`` rows of its input width. A lower bound on a decode step at this
    precision: attention, norms, sampling and the engine's own work all come on top."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in linears}
    times = []
    with torch.inference_mode():
        for r in range(repeats + 2):
            start = time.perf_counter()
            for m in linears:
                torch.nn.functional.linear(inputs[m.in_features], m.weight, m.bias)
            if r >= 2:  # two warm-up rounds
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def native_generate(engine, prompts, params):
    res = engine.generate(prompts, params)
    return int(res.stats["tokens"]), res.stats["seconds"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="embedded | smollm2 | a .gguf file | a save_pretrained causal LM directory "
                                     "(default: the embedded model)")
    src.add_argument("--random-tiny", action="store_true", help="random ~4.2 M-param Qwen2, random prompts")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens for every row")
    ap.add_argument("--prompt-len", type=int, default=32, help="length of random prompts (no chat template)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generic", action="store_true", help="force the native engine's generic HF-forward path")
    ap.add_argument("--floor", action="store_true", help="also time each batch's matmul floor (see above)")
    args = ap.parse_args(argv)

    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine

    torch.set_num_threads(args.threads)
    setup = load(args)
    model = setup.model
    n_params = sum(p.numel() for p in model.parameters())
    engine = NativeEngine(model, [] if args.ignore_eos else setup.eos_ids, tokenizer=setup.tokenizer,
                          max_batch_size=max(args.batch), pad_token_id=setup.pad_id,
                          fast_path=False if args.generic else None)
    print(f"model: {setup.name} ({n_params / 1e6:.2f} M params, {type(model).__name__}, "
          f"{next(model.parameters()).dtype})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; max_new_tokens={args.max_new_tokens}, "
          f"temperature={args.temperature}, top_p={args.top_p}, top_k=0, "
          f"EOS {'ignored' if args.ignore_eos else 'enabled ' + str(setup.eos_ids)}, "
          f"prompts: {'chat-templated rlspec.tasks' if setup.chat_prompts else f'random, {args.prompt_len} tokens'}")
    header = (f"{'batch':>5} | {'native tok/s':>12} | {'generate tok/s':>14} | {'ratio':>6} | "
              f"{'native toks':>11} | {'generate toks':>13}")
    rows = []
    for batch in args.batch:
        prompts = make_prompts(setup, batch, args.prompt_len, args.seed)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
        warm = SamplingParams(max_new_tokens=min(16, args.max_new_tokens), temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
        native_generate(engine, prompts, warm)
        hf_generate(setup, prompts, min(16, args.max_new_tokens), args.temperature, args.top_p, args.ignore_eos,
                    args.seed)
        nat, hf = [], []
        for r in range(args.repeats):
            params.seed = args.seed + r
            nat.append(native_generate(engine, prompts, params))
            hf.append(hf_generate(setup, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                  args.ignore_eos, args.seed + r))
        # median over repeats: robust to a repeat slowed down by other load on the machine
        nat_tps = statistics.median(t / s for t, s in nat)
        hf_tps = statistics.median(t / s for t, s in hf)
        floor_tps = batch / matmul_floor_seconds(model, batch) if args.floor else float("nan")
        rows.append((batch, nat_tps, hf_tps, nat_tps / hf_tps, statistics.mean(t for t, _ in nat),
                     statistics.mean(t for t, _ in hf), floor_tps))
        print(f"  batch {batch}: native {nat_tps:.0f} tok/s ({engine.last_backend} path), generate {hf_tps:.0f} tok/s",
              flush=True)
    print()
    print(header)
    print("-" * len(header))
    for batch, a, b, ratio, na, nb, _ in rows:
        print(f"{batch:>5} | {a:>12.0f} | {b:>14.0f} | {ratio:>5.2f}x | {na:>11.0f} | {nb:>13.0f}")
    print(f"(tok/s = generated tokens / wall seconds, median of {args.repeats} alternating repeats; "
          "toks = mean generated tokens per call)")
    if args.floor:
        print()
        print(f"{'batch':>5} | {'matmul floor tok/s':>18} | {'native % of floor':>17} | {'generate % of floor':>19} | "
              f"{'best possible ratio':>19}")
        for batch, a, b, _, _, _, floor in rows:
            print(f"{batch:>5} | {floor:>18.0f} | {100 * a / floor:>16.0f}% | {100 * b / floor:>18.0f}% | "
                  f"{floor / b:>18.2f}x")
        print("(matmul floor = the model's linear layers once on `batch` rows, median of 20; best possible ratio = "
              "floor tok/s / generate tok/s: the most any engine could gain on generate at this precision)")


if __name__ == "__main__":
    main()
