r"""Run a model on a benchmark the way the efficient-reasoning papers do, resumably.

Protocol (efficient-reasoning.md, "Standard evaluation protocol"): the model's chat template, the
question followed by the standard instruction ("Please reason step by step, and put your final
answer within \boxed{}."), temperature 0.6, top-p 0.95, ``samples`` responses per problem, a
token cap; every sample graded by :func:`rlspec.rewards.grader.grade` (the training reward's grader).
All of it is in :class:`RunnerSettings` and recorded with every result.

Every finished problem is appended as one JSON line to ``<out_dir>/<benchmark>.jsonl`` (all its
samples: text, extracted answer, tokens, verdict, finish reason). A rerun with the same settings
reads that file and only generates the problems that are not in it, so an interrupted run resumes
where it stopped; a line written under other settings is an error (choose another ``out``).

Problems are generated in batched calls (``call_rows`` rows = problems x samples each, default
``max_batch_size``; a problem's samples share a call), shortest prompt first, and written when
their call returns (so the file's lines are in that order; results are in problem order). Every
row draws from its own random stream (``SamplingParams.streams``) under the call seed ``seed``:
token ``j`` of a row uses the numbers of ``(seed, stream, j)``, so a row samples the same tokens
whichever rows share its call or batch, and batching costs nothing in reproducibility.

Seeding (``seeding``) says how a row's stream is keyed:

* ``per_problem`` (default): a stable 63-bit hash of ``(problem uid, sample index)``
  (:func:`problem_streams`), so a problem's samples do not depend on which other problems are
  evaluated, on ``limit``, on the order, on ``call_rows`` / ``max_batch_size`` or on an
  interruption + resume (generated alone or batched: the same tokens).
* ``shared``: ``position * samples + sample``, the position in the benchmark's problem list --
  exactly what :func:`rlspec.evals.heldout.evaluate` (the trainer's held-out eval) does, so the
  numbers match the training run's eval for the same checkpoint and settings. Results then depend
  on the problem order (not on ``limit``; a resumed run equals an uninterrupted one).

Files written before per-row streams (``per_problem`` drew from one seed per problem then) are
refused (:data:`SAMPLER_VERSION` is part of the settings fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from rlspec.config import STANDARD_INSTRUCTION, EvalSampling
from rlspec.data import build_prompt_ids
from rlspec.errors import ConfigError
from rlspec.evals.benchmarks import BENCHMARKS, BenchmarkProblem
from rlspec.evals.heldout import heldout_streams
from rlspec.evals.metrics import summarize_problems
from rlspec.models import decode_responses, eos_token_ids
from rlspec.prompts import check_prompt_template
from rlspec.rewards.grader import extract_final_answer, grade
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.native import NativeEngine
from rlspec.schema import setting

__all__ = ["RunnerSettings", "evaluate_benchmark", "problem_streams", "read_records"]

# how rows get their random numbers; part of the fingerprint, so results of another version are not
# mixed in on resume. 1: per_problem seeded one call per problem with hash(seed, uid); 2: per-row streams
SAMPLER_VERSION = 2


@dataclass
class RunnerSettings(EvalSampling):
    """Everything that decides a benchmark result (recorded in the JSONL lines and the summary);
    the ``eval.*`` keys of ``python -m rlspec.eval``.

    ``max_batch_size`` (sequences the native engine decodes at once) and ``call_rows`` (rows per
    ``generate`` call) do not change the samples (every row has its own random stream; beyond
    floating-point rounding) and are not part of the fingerprint.
    """

    samples: int = setting(4, "samples per problem (pass@1 averages over them; pass@k, maj@k use all)")
    max_new_tokens: int = setting(32768, "token cap per answer")
    seeding: Literal["per_problem", "shared"] = setting(
        "per_problem", "per_problem: each problem's samples from its own seed (independent of the problem set); "
                       "shared: one call over all problems, as the trainer's held-out eval")
    instruction: str = setting(STANDARD_INSTRUCTION, "appended to every question")
    prompt_template: str = setting("chat", "chat (the tokenizer's) | r1_zero | plain (base models) | a string with "
                                           "{question} (rlspec.prompts; the training run's data.prompt_template)")
    require_think_close: bool = setting(False, "grade only the text after </think>")
    last_number_fallback: Optional[bool] = setting(None, "no \\boxed{}: grade the last number; null = the "
                                                         "benchmark's convention (GSM8K: yes), true/false: every benchmark")
    grader_timeout_s: float = setting(5.0, "math-verify timeout per answer")
    max_batch_size: int = setting(256, "sequences decoded at once")
    call_rows: int = setting(0, "rows (problems x samples) per generate call, a problem's samples in one call; "
                                "0 = max_batch_size; samples do not depend on it (results are written per call)")

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"eval.{key} {what}, got {getattr(self, key)!r}")

        need(isinstance(self.samples, int) and self.samples >= 1, "samples", "must be an integer >= 1")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens", "must be an integer >= 1")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        need(self.seeding in ("per_problem", "shared"), "seeding", "must be one of per_problem, shared")
        need(self.grader_timeout_s > 0, "grader_timeout_s", "must be > 0 seconds")
        check_prompt_template(self.prompt_template, "eval.prompt_template")
        need(isinstance(self.max_batch_size, int) and self.max_batch_size >= 1, "max_batch_size", "must be an integer >= 1")
        need(isinstance(self.call_rows, int) and self.call_rows >= 0, "call_rows",
             "must be an integer >= 0 (0 = max_batch_size)")

    def record(self) -> dict[str, Any]:
        """The settings as written to result files (these fields only, also in a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(RunnerSettings)}

    def fingerprint(self) -> str:
        """A short hash of the settings that change the samples or their grading (and the sampler version)."""
        keep = {k: v for k, v in self.record().items() if k not in ("max_batch_size", "call_rows")}
        for key, default in (("prompt_template", "chat"), ("last_number_fallback", None)):
            if keep[key] == default:  # results written before the key existed still resume
                del keep[key]
        keep["sampler"] = SAMPLER_VERSION
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def problem_streams(uid: str, samples: int) -> tuple[int, ...]:
    """``per_problem`` seeding: the random-stream keys of a problem's samples, stable 63-bit hashes
    of ``(uid, sample index)`` (sample ``s``'s key does not depend on ``samples`` either).

    >>> a = problem_streams("math500/x", 2)
    >>> len(set(a)), a[:1] == problem_streams("math500/x", 1), all(0 <= s < 2**63 for s in a)
    (2, True, True)
    """
    keys = []
    for sample in range(samples):
        digest = hashlib.sha256(f"{uid}\0{sample}".encode()).digest()
        keys.append(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return tuple(keys)


def read_records(path: str | Path, fingerprint: str | None = None) -> dict[str, dict[str, Any]]:
    """The complete problem records of a per-problem JSONL file, by uid.

    A last line without its newline (a write cut off by a kill) is ignored; any other line that is
    not a JSON record raises :class:`ConfigError`, as does a record written under settings other
    than ``fingerprint`` (when given).
    """
    path = Path(path)
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the partial last line of an interrupted write
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            uid = record["uid"]
            record["samples"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number} is not a problem record of rlspec.eval; delete the file or choose another out=") from None
        if fingerprint is not None and record.get("sampler") != SAMPLER_VERSION:
            raise ConfigError(
                f"{path}:{number} was written by an earlier rlspec.eval (sampler version {record.get('sampler', 1)}, "
                f"now {SAMPLER_VERSION}: rows draw other random numbers), so it cannot be resumed; choose another "
                "out= or delete the file to start over"
            )
        if fingerprint is not None and record.get("settings_fingerprint") != fingerprint:
            raise ConfigError(
                f"{path} holds results of other eval settings ({path}:{number}: {record.get('settings')}); "
                f"choose another out= or delete the file to start over"
            )
        out[uid] = record
    return out


def _rewrite_complete(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """Drop a partial last line so new records start on a fresh line."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records.values():
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)


def call_chunks(problems: Sequence[BenchmarkProblem], samples: int, rows: int) -> list[list[BenchmarkProblem]]:
    """``problems`` in order, split into ``generate`` calls of at most ``rows`` rows (``samples``
    per problem; at least one problem per call).

    >>> [len(c) for c in call_chunks(list(range(5)), 2, 4)], [len(c) for c in call_chunks(list(range(2)), 3, 1)]
    ([2, 2, 1], [1, 1])
    """
    chunks: list[list[BenchmarkProblem]] = []
    for problem in problems:
        if not chunks or (len(chunks[-1]) + 1) * samples > rows:
            chunks.append([])
        chunks[-1].append(problem)
    return chunks


def engine_and_eos(model_or_engine: Any, tokenizer: Any, max_batch_size: int) -> tuple[Any, list[int]]:
    """A native engine for a model (or the given engine) and the EOS ids it stops at."""
    if isinstance(model_or_engine, torch.nn.Module):
        eos = eos_token_ids(model_or_engine, tokenizer)
        model_or_engine.eval()
        return NativeEngine(model_or_engine, eos, tokenizer=tokenizer, max_batch_size=max_batch_size), eos
    if not hasattr(model_or_engine, "generate"):
        raise TypeError(f"evaluate_benchmark needs a causal LM or a rollout engine, got {type(model_or_engine).__name__}")
    eos = getattr(model_or_engine, "eos_token_ids", None)
    if not eos:
        raise TypeError("the rollout engine has no eos_token_ids; pass the model instead")
    return model_or_engine, [int(t) for t in eos]


class _Bar:
    """A rich progress bar showing the running pass@1 (nothing when disabled)."""

    def __init__(self, enabled: bool, name: str, total: int, done: int) -> None:
        self._p = None
        self.name = name
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TimeRemainingColumn())
            self._p.__enter__()
            self._task = self._p.add_task(name, total=total, completed=done)

    def update(self, done: int, correct: float, samples: int) -> None:
        if self._p is not None:
            acc = f"{100 * correct / samples:.1f}%" if samples else "n/a"
            self._p.update(self._task, completed=done, description=f"{self.name} pass@1 {acc}")

    def close(self) -> None:
        if self._p is not None:
            self._p.__exit__(None, None, None)


def evaluate_benchmark(
    model_or_engine: Any,
    tokenizer: Any,
    problems: Sequence[BenchmarkProblem],
    settings: RunnerSettings,
    out_dir: str | Path,
    progress: bool = True,
    *,
    benchmark: str | None = None,
    on_problem: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Sample, grade and score ``problems``; resume from ``<out_dir>/<benchmark>.jsonl``.

    Args:
        model_or_engine: an HF causal LM (wrapped in a :class:`~rlspec.rollout.native.NativeEngine`)
            or an engine with ``generate(prompt_ids, SamplingParams)`` and ``eos_token_ids``.
        tokenizer: the model's tokenizer (chat template, decoding).
        problems: from :func:`rlspec.evals.benchmarks.load_benchmark`.
        settings: the protocol; see :class:`RunnerSettings`.
        out_dir: where ``<benchmark>.jsonl`` is written (created if needed).
        progress: show a progress bar with the running pass@1.
        benchmark: the name used for the file; default: the uid prefix of the problems
            (``math500/...`` -> ``math500``).
        on_problem: called with each new record after it is written (tests use it to interrupt).

    Returns ``{"benchmark", "settings", "metrics", "generated", "records"}``: ``metrics`` from
    :func:`rlspec.evals.metrics.summarize_problems` over ``problems`` (k = ``settings.samples``),
    ``generated`` the number of problems sampled in this call (the rest came from the file).
    """
    if not problems:
        raise ConfigError("no problems to evaluate (eval.limit or the benchmark file is empty)")
    uids = [p.uid for p in problems]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise ConfigError(f"benchmark has two problems with uid {dup!r}; uids must be unique to resume by them")
    name = benchmark or problems[0].uid.split("/", 1)[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    fingerprint = settings.fingerprint()
    done = read_records(path, fingerprint)
    _rewrite_complete(path, done)
    pending = [p for p in problems if p.uid not in done]
    engine, eos = (None, []) if not pending else engine_and_eos(model_or_engine, tokenizer, settings.max_batch_size)

    k = settings.samples
    finished = [done[p.uid] for p in problems if p.uid in done]
    correct = sum(s["correct"] for r in finished for s in r["samples"])
    sampled = sum(len(r["samples"]) for r in finished)
    bar = _Bar(progress, name, len(problems), len(finished))
    bar.update(len(finished), correct, sampled)

    position = {p.uid: i for i, p in enumerate(problems)}

    def streams(problem: BenchmarkProblem) -> tuple[int, ...]:
        if settings.seeding == "shared":  # keyed by position, as heldout.evaluate
            return heldout_streams([position[problem.uid]], k)
        return problem_streams(problem.uid, k)

    prompts = dict(zip([p.uid for p in pending], build_prompt_ids(
        tokenizer, [{"question": p.question} for p in pending], settings.instruction,
        settings.prompt_template))) if pending else {}
    # generated (and written) shortest prompt first: calls and prefill chunks of similar lengths pad
    # less; the samples do not depend on it, and a resumed run writes the same lines in the same order
    by_length = sorted(pending, key=lambda p: len(prompts[p.uid]))
    chunks = call_chunks(by_length, k, settings.call_rows or settings.max_batch_size)
    # GSM8K's convention: a response without \boxed{} is graded on its last number
    fallback = settings.last_number_fallback
    if fallback is None:
        fallback = bool(name in BENCHMARKS.names() and BENCHMARKS.get(name).last_number_fallback)
    try:
        with open(path, "a", encoding="utf-8") as f:
            for chunk in chunks:
                prompt_ids = [prompts[p.uid] for p in chunk]
                repeated = [list(ids) for ids in prompt_ids for _ in range(k)]
                keys = [streams(p) for p in chunk]
                result = engine.generate(repeated, SamplingParams(
                    max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                    top_k=settings.top_k, seed=settings.seed, streams=tuple(key for ks in keys for key in ks)))
                texts = decode_responses(tokenizer, result.response_ids, eos)
                for j, problem in enumerate(chunk):
                    samples = []
                    for i in range(j * k, (j + 1) * k):
                        ok = grade(texts[i], problem.answer, require_think_close=settings.require_think_close,
                                   timeout_s=settings.grader_timeout_s, last_number_fallback=fallback)
                        samples.append({
                            "text": texts[i],
                            "answer": extract_final_answer(texts[i], require_think_close=settings.require_think_close,
                                                           last_number_fallback=fallback),
                            "tokens": len(result.response_ids[i]),
                            "correct": bool(ok),
                            "finish_reason": result.finish_reasons[i],
                        })
                    record = {
                        "uid": problem.uid,
                        "gold": problem.answer,
                        "level": problem.level,
                        "subject": problem.subject,
                        "seed": settings.seed,
                        "streams": list(keys[j]),
                        "sampler": SAMPLER_VERSION,
                        "prompt_tokens": len(prompt_ids[j]),
                        "samples": samples,
                        "settings_fingerprint": fingerprint,
                        "settings": settings.record(),
                    }
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    done[problem.uid] = record
                    correct += sum(s["correct"] for s in samples)
                    sampled += len(samples)
                    finished.append(record)
                    bar.update(len(finished), correct, sampled)
                    if on_problem is not None:
                        on_problem(record)
    finally:
        bar.close()
    records = [done[p.uid] for p in problems]
    return {
        "benchmark": name,
        "settings": settings.record(),
        "metrics": summarize_problems(records, k),
        "generated": len(pending),
        "records": records,
    }
