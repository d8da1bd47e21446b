"""How the embedded default is measured: accuracy and lengths, the long tail, budget forcing, and
how well the model follows budget statements. The build card (:mod:`rlspec.embedded_build`) is made
of these figures.

* :func:`sample_records` + :func:`summarize` -- one sampled response per problem: accuracy, format,
  length percentiles (p99 and the share cut by the cap: the long tail), re-check counts, per level.
* :func:`budget_forcing` -- s1's budget forcing (Muennighoff et al. 2025, arXiv 2501.19393) used as
  a probe: each response is cut after its first pass, ``</think>`` and the answer prefix are
  forced, and the answer is decoded greedily. Accuracy with the checks cut against accuracy with
  full thinking, per level, says where checking pays.
* :func:`budget_following` -- mean length under HBPO's budget prefill (arXiv 2507.15844 Sec. 3.1)
  per budget, and under L1's "Think for n tokens." (arXiv 2503.04697 Sec. 3) with the mean
  relative length error ``|n_y - n| / n``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from rlspec import tasks
from rlspec.rewards.hbpo import HBPO_TEMPLATES
from rlspec.rewards.l1 import L1_TEMPLATE
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.native import NativeEngine

FORCED_ANSWER = "\n</think>\nThe answer is \\boxed{"  # appended after the cut first pass


def prompt_text(tokenizer, problem: tasks.MathProblem) -> str:
    return tokenizer.apply_chat_template(tasks.format_prompt_messages(problem), tokenize=False,
                                         add_generation_prompt=True)


def l1_prompt_text(tokenizer, problem: tasks.MathProblem, target: int, template: str = L1_TEMPLATE) -> str:
    """The prompt with L1's target-length instruction after the user message, as the ``l1`` rollout
    hook writes it (:func:`rlspec.trainers.hooks.l1.l1_budgeted_prompts`)."""
    messages = tasks.format_prompt_messages(problem)
    messages[-1]["content"] += " " + template.format(budget=target)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def sample_records(
    model,
    tokenizer,
    problems: Sequence[tasks.MathProblem],
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    progress: Any = None,
    label: str = "eval",
    prompt_fn: Callable[[Any, tasks.MathProblem], str] = prompt_text,
) -> list[dict]:
    """One sampled response per problem (:class:`~rlspec.rollout.native.NativeEngine`), as records
    with level, tokens (EOS included), truncated, correct, well_formed, rechecks, and the prompt
    and response text."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(problems)), key=lambda i: (problems[i].level, i))  # similar lengths together
    records: list[dict] = [{} for _ in problems]
    task = progress.add_task(label, total=len(problems)) if progress else None
    engine = NativeEngine(model, [eos_id], tokenizer=tokenizer, max_batch_size=batch_size, pad_token_id=pad_id)
    chunk = 4 * batch_size  # the engine refills its slots itself
    for chunk_no, start in enumerate(range(0, len(order), chunk)):
        idx = order[start: start + chunk]
        texts = [prompt_fn(tokenizer, problems[i]) for i in idx]
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        res = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                      top_p=top_p, seed=seed * 100003 + chunk_no))
        for ids, i, prompt in zip(res.response_ids, idx, texts):
            n = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            pred = tasks.extract_boxed_int(text.split("</think>")[-1]) if "</think>" in text else None
            records[i] = {"level": problems[i].level, "tokens": n, "truncated": eos_id not in ids,
                          "correct": pred == problems[i].answer, "well_formed": tasks.is_well_formed(text),
                          "rechecks": tasks.count_rechecks(text), "prompt": prompt, "text": text}
        if progress:
            progress.update(task, advance=len(idx))
    return records


def summarize(records: list[dict]) -> dict:
    """Aggregate per-response records (level, tokens, truncated, correct, well_formed, rechecks):
    accuracy, format, mean and p50/p90/p99/max tokens, the share cut by the cap, re-check counts
    (with accuracy and mean tokens per count) and accuracy/length per level."""
    n = len(records)
    lens = sorted(r["tokens"] for r in records)

    def pct(q: float) -> int:
        return lens[min(n - 1, int(q * n))]

    by_rc: dict[int, list[dict]] = defaultdict(list)
    by_lv: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_rc[r["rechecks"]].append(r)
        by_lv[r["level"]].append(r)
    return {
        "n": n,
        "accuracy": round(sum(r["correct"] for r in records) / n, 4),
        "well_formed": round(sum(r["well_formed"] for r in records) / n, 4),
        "truncated": round(sum(r["truncated"] for r in records) / n, 4),
        "mean_tokens": round(sum(lens) / n, 1),
        "p50_tokens": pct(0.5),
        "p90_tokens": pct(0.9),
        "p99_tokens": pct(0.99),
        "max_tokens": lens[-1],
        "frac_zero_rechecks": round(len(by_rc.get(0, [])) / n, 4),
        "by_rechecks": {str(k): {"frac": round(len(v) / n, 4),
                                 "accuracy": round(sum(r["correct"] for r in v) / len(v), 4),
                                 "mean_tokens": round(sum(r["tokens"] for r in v) / len(v), 1)}
                        for k, v in sorted(by_rc.items())},
        "by_level": {str(k): {"n": len(v), "accuracy": round(sum(r["correct"] for r in v) / len(v), 4),
                              "mean_tokens": round(sum(r["tokens"] for r in v) / len(v), 1)}
                     for k, v in sorted(by_lv.items())},
    }


@torch.inference_mode()
def budget_forcing(model, tokenizer, problems: Sequence[tasks.MathProblem], records: list[dict],
                   batch_size: int = 64) -> dict:
    """Accuracy per level with full thinking (the records) and with the checks cut: each response
    is cut after its first pass (:func:`rlspec.tasks.first_pass_end`), :data:`FORCED_ANSWER` is
    appended and the answer decoded greedily. A response without a first pass counts as wrong when
    cut. Returns ``{level: {n, full, cut, drop, rechecked}}`` (``drop`` = full - cut, in points)."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    forced, where = [], []
    for i, r in enumerate(records):
        end = tasks.first_pass_end(r["text"])
        if end >= 0:
            forced.append(tokenizer(r["prompt"] + r["text"][:end] + FORCED_ANSWER, add_special_tokens=False)["input_ids"])
            where.append(i)
    cut_correct = [False] * len(records)
    if forced:
        engine = NativeEngine(model, [eos_id], tokenizer=tokenizer, max_batch_size=batch_size, pad_token_id=pad_id)
        out = engine.generate(forced, SamplingParams(max_new_tokens=6, temperature=0.0))
        for i, ids in zip(where, out.response_ids):
            digits = tokenizer.decode(ids, skip_special_tokens=True).split("}")[0].strip()
            cut_correct[i] = digits == problems[i].answer
    by_level: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_level[r["level"]].append(i)
    result = {}
    for lv, idx in sorted(by_level.items()):
        full = sum(records[i]["correct"] for i in idx) / len(idx)
        cut = sum(cut_correct[i] for i in idx) / len(idx)
        result[str(lv)] = {"n": len(idx), "full": round(full, 4), "cut": round(cut, 4),
                           "drop": round(100 * (full - cut), 1),
                           "rechecked": round(sum(records[i]["rechecks"] > 0 for i in idx) / len(idx), 4)}
    return result


def budget_following(model, tokenizer, problems: Sequence[tasks.MathProblem], hbpo_budgets: Sequence[int],
                     l1_targets: Sequence[int], **kwargs: Any) -> dict:
    """Mean tokens per HBPO budget prefill, and per L1 target with its mean ``|n_y - n| / n``."""
    hbpo = {}
    for b in hbpo_budgets:
        prefill = HBPO_TEMPLATES["paper"].format(budget=b)
        recs = sample_records(model, tokenizer, problems, prompt_fn=lambda tok, p: prompt_text(tok, p) + prefill,
                              label=f"hbpo {b}", **kwargs)
        hbpo[str(b)] = {"mean_tokens": round(sum(r["tokens"] for r in recs) / len(recs), 1),
                        "accuracy": round(sum(r["correct"] for r in recs) / len(recs), 4)}
    l1 = {}
    for n in l1_targets:
        recs = sample_records(model, tokenizer, problems, prompt_fn=lambda tok, p: l1_prompt_text(tok, p, n),
                              label=f"l1 {n}", **kwargs)
        l1[str(n)] = {"mean_tokens": round(sum(r["tokens"] for r in recs) / len(recs), 1),
                      "rel_error": round(sum(abs(r["tokens"] - n) / n for r in recs) / len(recs), 3),
                      "accuracy": round(sum(r["correct"] for r in recs) / len(recs), 4)}
    return {"hbpo": hbpo, "l1": l1}


def summary_line(name: str, ev: dict) -> str:
    return (f"{name}: acc {ev['accuracy']:.3f}, well-formed {ev['well_formed']:.3f}, mean {ev['mean_tokens']} tok "
            f"(p50 {ev['p50_tokens']}, p99 {ev['p99_tokens']}, max {ev['max_tokens']}, cut by the cap "
            f"{100 * ev['truncated']:.1f}%), zero re-checks {ev['frac_zero_rechecks']:.2f}")
