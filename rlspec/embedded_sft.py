"""The embedded default's SFT data: worked solutions (with slips, spirals, budget prefills and L1
targets) and arithmetic-fact drills, as deterministic ``(input_ids, labels)`` batches.

What the data teaches, and why, is :mod:`rlspec.embedded_build`'s docstring and docs/decisions.md;
every knob is a field of :class:`~rlspec.embedded_config.EmbeddedModelConfig`.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch

from rlspec import tasks
from rlspec.embedded_config import EmbeddedModelConfig
from rlspec.embedded_eval import l1_prompt_text, prompt_text
from rlspec.rewards.hbpo import HBPO_TEMPLATES
from rlspec.rewards.l1 import L1_MAX_TEMPLATE, L1_TEMPLATE


def sft_batches(cfg: EmbeddedModelConfig, train: list[tasks.MathProblem], tokenizer, eos_id: int):
    """Deterministic SFT batches: level-balanced worked solutions plus interleaved fact drills.

    Solution batches: each example is a fresh worked solution (random re-check count and wording)
    of a train problem drawn level-uniformly; the first ``plain_frac`` use zero re-checks, no slips
    and the steps written out (any ``first_pass``). The rest slip at ``slip_rates[level]`` (with
    ``mask_slips`` a slipped glance's value is out of the loss, and so is every glance of a level
    outside ``taught_glance_levels``); ``spiral_frac`` of them are spirals
    cut off without EOS; of the others ``budget_frac`` carry an HBPO budget prefill (the most
    re-checks that fit), ``l1_frac`` an L1 target-length instruction, the remainder 0 re-checks
    with probability ``recheck_p0`` else uniform 1..max_rechecks. Length-bucketed; loss on
    completion tokens only (labels -100 on prompt and padding).
    Drill batches (a ``drill_frac`` share, spread evenly): packed sequences of the single-step
    facts of the train split ("12*4=48" per line, or in each of ``drill_phrasings``), loss on the
    results only -- dense, cheap arithmetic practice -- followed by the same block verbatim, loss on
    every token (copy practice).
    Returns a list of ``(input_ids, labels)`` tensors.
    """
    rng = random.Random(f"rlspec-embedded-sft-{cfg.seed}")
    n_drill = int(round(cfg.drill_frac * cfg.sft_steps))
    n_sol_steps = cfg.sft_steps - n_drill
    by_level: dict[int, list[tasks.MathProblem]] = defaultdict(list)
    for p in train:
        by_level[p.level].append(p)
    levels = sorted(by_level)
    n = n_sol_steps * cfg.batch_size
    probs = [rng.choice(by_level[rng.choice(levels)]) for _ in range(n)]
    prompts = [prompt_text(tokenizer, p) for p in probs]
    n_plain = int(cfg.plain_frac * n_sol_steps) * cfg.batch_size
    style = dict(first_pass=cfg.first_pass, glance_sep=cfg.glance_phrasing)
    comps, closed, masked = [], [], []
    for j, p in enumerate(probs):
        if j < n_plain:  # steps written out in any style: a glance alone holds no arithmetic to learn
            comps.append(tasks.worked_solution(p, rng, 0))
            closed.append(True)
            masked.append(False)
            continue
        slip = rng.random() < tasks.slip_rate(p.level, cfg.slip_rates)
        masked.append(cfg.mask_slips and (slip or p.level not in cfg.taught_glance_levels))
        u = rng.random()
        if u < cfg.spiral_frac:  # an over-thinking spiral, cut by the length cap: no answer, no EOS
            text = tasks.worked_solution(p, rng, 60, slip=slip, close=False, **style)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: rng.randint(*cfg.spiral_tokens)]
            comps.append(tokenizer.decode(ids))
            closed.append(False)
            continue
        u = rng.random()
        if u < cfg.budget_frac:
            i = rng.randrange(len(cfg.budgets))
            prompts[j] += HBPO_TEMPLATES["paper"].format(budget=cfg.budgets[i])
            comps.append(fit_budget(p, rng, cfg.max_rechecks, cfg.budgets[i], tokenizer, slip=slip, **style))
        elif u < cfg.budget_frac + cfg.l1_frac:
            text = tasks.worked_solution(p, rng, rng.randint(0, cfg.max_rechecks), slip=slip, **style)
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            at_most = rng.random() < 1 / 3
            target = round(n_tokens * (rng.uniform(1.0, 1.4) if at_most else rng.uniform(0.85, 1.15)))
            prompts[j] = l1_prompt_text(tokenizer, p, target, L1_MAX_TEMPLATE if at_most else L1_TEMPLATE)
            comps.append(text)
        else:
            comps.append(tasks.worked_solution(p, rng, num_rechecks(rng, cfg, p.level), slip=slip, **style))
        closed.append(True)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    enc = tokenizer(comps, add_special_tokens=False, return_offsets_mapping=True)
    c_ids = enc["input_ids"]
    c_labels = [list(ids) for ids in c_ids]
    for text, offsets, lab, mask in zip(comps, enc["offset_mapping"], c_labels, masked):
        span = tasks.glance_value_span(text) if mask else None
        if span is not None:  # a slipped glance's value: shown, not taught
            for i, (lo, hi) in enumerate(offsets):
                if lo < span[1] and hi > span[0]:
                    lab[i] = -100
    examples = [(a, b + [eos_id] if c else b, lab + [eos_id] if c else lab)
                for a, b, c, lab in zip(p_ids, c_ids, closed, c_labels)]
    sol_batches = []
    chunk = cfg.batch_size * 16
    for start in range(0, n, chunk):  # bucket by length inside chunks, shuffle batches within a chunk
        part = sorted(examples[start : start + chunk], key=lambda e: len(e[0]) + len(e[1]))
        group = [part[i : i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size)]
        rng.shuffle(group)
        sol_batches += group
    out = []
    for b in sol_batches:
        width = max(len(a) + len(c) for a, c, _ in b)
        ids = torch.full((len(b), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(b), width), -100, dtype=torch.long)
        for i, (a, c, lab) in enumerate(b):  # right padding: causal attention never sees it
            ids[i, : len(a) + len(c)] = torch.tensor(a + c)
            labels[i, len(a) : len(a) + len(c)] = torch.tensor(lab)
        out.append((ids, labels))
    if not n_drill:
        return out
    drills = _drill_batches(cfg, train, tokenizer, rng, n_drill)
    merged, d = [], 0
    for j in range(cfg.sft_steps):  # spread the drill batches evenly over the run
        if d < n_drill and (j + 1) * n_drill // cfg.sft_steps > d:
            merged.append(drills[d])
            d += 1
        else:
            merged.append(out.pop(0) if out else drills[d])
    return merged


def _drill_batches(cfg: EmbeddedModelConfig, train: list[tasks.MathProblem], tokenizer, rng: random.Random,
                   n_drill: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_drill`` batches of packed fact lines (:func:`sft_batches`)."""
    op_of = {s.text(): s.op for p in train for s in p.steps}
    facts = sorted(op_of)
    ops = sorted(set(op_of.values()))
    by_op = {op: [j for j, f in enumerate(facts) if op_of[f] == op] for op in ops}  # indices of its facts
    # per fact and phrasing: its line's ids, and labels only on the result digits and the newline
    # (the operands are random)
    fact_ids, fact_labels = [], []
    for f in facts:
        lhs, result = f.split("=")
        ids_k, labels_k = [], []
        for sep in cfg.drill_phrasings:
            head = tokenizer(lhs + sep.rstrip(), add_special_tokens=False)["input_ids"]
            ids = tokenizer(lhs + sep + result + "\n", add_special_tokens=False)["input_ids"]
            if ids[: len(head)] != head:
                raise RuntimeError(f"the tokenizer splits {lhs + sep + result!r} inside {lhs + sep!r}")
            ids_k.append(ids)
            labels_k.append([-100] * len(head) + ids[len(head):])
        fact_ids.append(ids_k)
        fact_labels.append(labels_k)
    n_phrasings = len(cfg.drill_phrasings)
    drills = []
    half = cfg.drill_seq_len // 2
    for _ in range(n_drill):
        rows, lab_rows = [], []
        for _ in range(cfg.batch_size):
            seq: list[int] = []
            lab: list[int] = []
            while len(seq) < half:
                j = rng.choice(by_op[rng.choice(ops)]) if cfg.drill_by_op else rng.randrange(len(fact_ids))
                k = rng.randrange(n_phrasings) if n_phrasings > 1 else 0
                seq += fact_ids[j][k]
                lab += fact_labels[j][k]
            seq, lab = seq[:half], lab[:half]
            # the block again, verbatim: every token of the repeat is predictable by copying, which
            # trains the induction (copy) circuits the worked solutions and re-checks rely on
            rest = cfg.drill_seq_len - half
            rows.append(seq + seq[:rest])
            lab_rows.append(lab + seq[:rest])
        drills.append((torch.tensor(rows), torch.tensor(lab_rows)))
    return drills


def fit_budget(problem: tasks.MathProblem, rng: random.Random, max_rechecks: int, budget: int, tokenizer,
               slip: bool = False, first_pass: str = "steps", glance_sep: str = " is ") -> str:
    """The worked solution with the most re-checks (<= max_rechecks) whose tokens, EOS included,
    fit within ``budget``; zero re-checks when even that does not fit."""
    state = rng.getstate()
    best = None
    for k in range(max_rechecks + 1):
        rng.setstate(state)  # the same opener wording for every candidate
        text = tasks.worked_solution(problem, rng, k, slip=slip, first_pass=first_pass, glance_sep=glance_sep)
        if best is None or len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 <= budget:
            best = text
        else:
            break
    return best


def num_rechecks(rng: random.Random, cfg: EmbeddedModelConfig, level: int) -> int:
    """0 with probability ``recheck_p0`` (or the level's ``recheck_p0_by_level``), else uniform
    over 1..max_rechecks."""
    p0 = cfg.recheck_p0_by_level[level - 1] if cfg.recheck_p0_by_level else cfg.recheck_p0
    if cfg.max_rechecks == 0 or rng.random() < p0:
        return 0
    return rng.randint(1, cfg.max_rechecks)
