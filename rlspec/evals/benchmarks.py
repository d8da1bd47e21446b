r"""Math benchmarks for evaluation: MATH-500, AIME 2024/2025, AMC 2023, GSM8K and the held-out split.

Each benchmark is a :class:`BenchmarkSpec` in :data:`BENCHMARKS`: where it lives on the hub, which
fields hold the question / answer / solution / metadata, and how the answer is cleaned. Every row
becomes a :class:`BenchmarkProblem`. Rows are read from a local file or directory when a path is
given (``eval.benchmarks.<name>.path``; JSONL, JSON array, parquet, or MathArena's
``answers.csv`` + ``problems/*.tex`` layout) and otherwise from the hub through
``datasets.load_dataset``.

A malformed row (missing field, empty answer, non-string question, ...) raises
:class:`~rlspec.errors.DataError` naming the source, the row index and the field; nothing is
silently skipped.

Hub sources (the ones the efficient-reasoning papers evaluate on):

============  ==================================  =====  ==============================================
name          hub id                              split  notes
============  ==================================  =====  ==============================================
``math500``   ``HuggingFaceH4/MATH-500``          test   PRM800K's 500-problem MATH test subset
``aime24``    ``HuggingFaceH4/aime_2024``         train  AIME 2024 I+II (30); answers are strings
``aime25``    ``yentinglin/aime_2025``            train  AIME 2025 I+II (30)
``amc23``     ``math-ai/amc23``                   test   the 40-problem AMC 2023 set of Qwen2.5-Math's
                                                         evaluation (not ``AI-MO/aimo-validation-amc``,
                                                         which has 83 problems from AMC 2022+2023)
``gsm8k``     ``openai/gsm8k`` (config ``main``)  test   answer = the part after ``#### ``
``heldout``   none                                       rlspec's procedural test split
============  ==================================  =====  ==============================================
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlspec import tasks
from rlspec.data import DATA_SUFFIXES, read_rows, read_utf8
from rlspec.embedded_config import EmbeddedModelConfig
from rlspec.errors import DataError
from rlspec.registry import BENCHMARKS

__all__ = [
    "BENCHMARKS",
    "BenchmarkProblem",
    "BenchmarkSpec",
    "benchmark_names",
    "clean_answer",
    "get_benchmark",
    "gsm8k_answer",
    "load_benchmark",
    "problems_from_rows",
]


@dataclass(frozen=True)
class BenchmarkProblem:
    """One benchmark problem. ``answer`` is the gold final answer as text (what the grader gets)."""

    uid: str
    question: str
    answer: str
    solution: str | None = None
    level: int | str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how its rows map onto :class:`BenchmarkProblem`.

    ``question_fields`` / ``answer_fields`` are tried in order (the first present wins: the hub
    copy and the common local copies of a benchmark do not always agree on the column name).
    ``answer_transform`` turns the raw answer text into the gold answer and may return
    ``(answer, solution)`` when the answer column also holds the worked solution (GSM8K).
    """

    name: str
    description: str
    hub_id: str | None
    hub_split: str
    hub_config: str | None = None
    question_fields: tuple[str, ...] = ("problem",)
    answer_fields: tuple[str, ...] = ("answer",)
    solution_field: str | None = None
    level_field: str | None = None
    subject_field: str | None = None
    uid_field: str | None = None
    local_split: str = "test"
    answer_transform: Callable[[str], tuple[str, str | None]] | None = None
    expected_rows: int | None = None
    # grade the last number when a response has no \boxed{} (GSM8K's convention only)
    last_number_fallback: bool = False


def _add(spec: BenchmarkSpec) -> BenchmarkSpec:
    BENCHMARKS.register(spec.name)(spec)
    return spec


_GSM8K_MARK = "####"


def gsm8k_answer(text: str) -> tuple[str, str | None]:
    """GSM8K's answer column -> ``(final answer, worked solution)``.

    The final answer is the text after the last ``#### `` with thousands separators removed
    (``"#### 1,000"`` -> ``"1000"``); the solution is everything before it.

    >>> gsm8k_answer("3 + 4 = <<3+4=7>>7\\n#### 7")
    ('7', '3 + 4 = <<3+4=7>>7')
    """
    if _GSM8K_MARK not in text:
        raise ValueError("has no '#### ' final-answer line")
    solution, _, final = text.rpartition(_GSM8K_MARK)
    final = final.strip().replace(",", "")
    if final.endswith(".") and re.fullmatch(r"-?[\d.]+\.", final):
        final = final[:-1]
    return final, solution.strip() or None


def clean_answer(value: Any) -> str:
    """A raw answer cell as gold text: floats that are integers lose their ``.0`` (AMC's ``27.0``
    -> ``"27"``), strings are stripped. Raises ``ValueError`` for anything that is not an answer."""
    if isinstance(value, bool):
        raise ValueError(f"is a boolean ({value!r}), not an answer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"is {value!r}, not an answer")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f"is a {type(value).__name__}, not a string or number")


_add(BenchmarkSpec(
    name="math500",
    description="MATH-500 (PRM800K test subset of MATH)",
    hub_id="HuggingFaceH4/MATH-500",
    hub_split="test",
    question_fields=("problem",),
    solution_field="solution",
    level_field="level",
    subject_field="subject",
    uid_field="unique_id",
    expected_rows=500,
))
_add(BenchmarkSpec(
    name="aime24",
    description="AIME 2024 I + II",
    hub_id="HuggingFaceH4/aime_2024",
    hub_split="train",
    question_fields=("problem", "question"),
    solution_field="solution",
    uid_field="id",
    expected_rows=30,
))
_add(BenchmarkSpec(
    name="aime25",
    description="AIME 2025 I + II",
    hub_id="yentinglin/aime_2025",
    hub_split="train",
    question_fields=("problem", "question"),
    solution_field="solution",
    uid_field="id",
    expected_rows=30,
))
_add(BenchmarkSpec(
    name="amc23",
    description="AMC 2023 (the 40-problem set of Qwen2.5-Math's evaluation)",
    hub_id="math-ai/amc23",
    hub_split="test",
    question_fields=("problem", "question"),
    uid_field="id",
    expected_rows=40,
))
_add(BenchmarkSpec(
    name="gsm8k",
    description="GSM8K test",
    hub_id="openai/gsm8k",
    hub_split="test",
    hub_config="main",
    question_fields=("question",),
    answer_transform=gsm8k_answer,
    expected_rows=1319,
    last_number_fallback=True,
))
_add(BenchmarkSpec(
    name="heldout",
    description="rlspec's procedural held-out split (the embedded default's test.jsonl)",
    hub_id=None,
    hub_split="test",
    question_fields=("question",),
    level_field="level",
    uid_field="uid",
))


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of ``name``; an unknown name raises ConfigError listing the valid ones."""
    return BENCHMARKS.get(name)


def benchmark_names() -> list[str]:
    return BENCHMARKS.names()


# ----------------------------------------------------------------------------------------------
# Row mapping
# ----------------------------------------------------------------------------------------------


def _pick(row: dict[str, Any], fields: tuple[str, ...]) -> tuple[str, Any]:
    for name in fields:
        if name in row and row[name] is not None:
            return name, row[name]
    return fields[0], None


def _row_error(source: str, index: int, field_name: str, problem: str, row: dict[str, Any] | None = None) -> DataError:
    have = f" (fields: {', '.join(sorted(map(str, row)))})" if isinstance(row, dict) else ""
    return DataError(f"{source}: row {index}: field {field_name!r} {problem}{have}; fix or remove that row")


def problems_from_rows(spec: BenchmarkSpec, rows: list[Any], source: str) -> list[BenchmarkProblem]:
    """Map raw rows onto :class:`BenchmarkProblem` per ``spec``; malformed rows raise DataError."""
    out: list[BenchmarkProblem] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {index} is a {type(row).__name__}, not an object; fix or remove that row")
        q_name, question = _pick(row, spec.question_fields)
        if question is None:
            alternatives = " or ".join(repr(f) for f in spec.question_fields[1:])
            also = f" (nor {alternatives})" if alternatives else ""
            raise _row_error(source, index, q_name, f"is missing{also}", row)
        if not isinstance(question, str):
            raise _row_error(source, index, q_name, f"is a {type(question).__name__}, not a string", row)
        if not question.strip():
            raise _row_error(source, index, q_name, "is empty", row)
        a_name, raw_answer = _pick(row, spec.answer_fields)
        if raw_answer is None:
            raise _row_error(source, index, a_name, "is missing", row)
        try:
            answer_text = clean_answer(raw_answer)
            solution = None
            if spec.answer_transform is not None:
                answer_text, solution = spec.answer_transform(answer_text)
        except ValueError as err:
            raise _row_error(source, index, a_name, str(err), row) from None
        if not answer_text:
            raise _row_error(source, index, a_name, "is empty", row)
        if spec.solution_field is not None and isinstance(row.get(spec.solution_field), str):
            solution = row[spec.solution_field]
        level = row.get(spec.level_field) if spec.level_field else None
        if isinstance(level, str):  # MATH's "Level 3"
            match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", level)
            level = int(match.group(1)) if match else level.strip() or None
        subject = row.get(spec.subject_field) if spec.subject_field else None
        uid_value = row.get(spec.uid_field) if spec.uid_field else None
        uid = f"{spec.name}/{uid_value}" if uid_value not in (None, "") else f"{spec.name}/{index}"
        out.append(BenchmarkProblem(
            uid=uid,
            question=question.strip(),
            answer=answer_text,
            solution=solution,
            level=level,
            subject=str(subject) if subject is not None else None,
        ))
    return out


# ----------------------------------------------------------------------------------------------
# Sources: local files, MathArena directories, the hub, the procedural split
# ----------------------------------------------------------------------------------------------


def _is_matharena_dir(path: Path) -> bool:
    return (path / "answers.csv").is_file() and (path / "problems").is_dir()


def _read_matharena(directory: Path) -> list[dict[str, Any]]:
    """MathArena's layout: ``answers.csv`` (``id,answer``) + ``problems/{id}.tex``. A directory whose
    sub-directories have that layout (``aime_2025_I``, ``aime_2025_II``) is read in name order."""
    if _is_matharena_dir(directory):
        parts = [directory]
    else:
        parts = sorted(p for p in directory.iterdir() if p.is_dir() and _is_matharena_dir(p))
    rows: list[dict[str, Any]] = []
    for part in parts:
        answers = part / "answers.csv"
        with io.StringIO(read_utf8(answers), newline="") as f:  # not UTF-8: one line naming file and line
            reader = csv.DictReader(f)
            for line, rec in enumerate(reader, start=2):
                if rec.get("id") is None or rec.get("answer") is None:
                    raise DataError(f"{answers}:{line}: expected columns id,answer (got {reader.fieldnames})")
                tex = part / "problems" / f"{rec['id'].strip()}.tex"
                if not tex.is_file():
                    raise DataError(f"{answers}:{line}: problem id {rec['id']!r} has no {tex}")
                rows.append({
                    "id": f"{part.name}/{rec['id'].strip()}",
                    "problem": read_utf8(tex),
                    "answer": rec["answer"],
                })
    return rows


def _read_local(spec: BenchmarkSpec, path: Path) -> tuple[list[Any], str]:

    if not path.exists():
        raise DataError(f"benchmark {spec.name}: {path} does not exist; check eval.benchmarks.{spec.name}.path")
    if path.is_dir():
        if _is_matharena_dir(path) or any(_is_matharena_dir(p) for p in path.iterdir() if p.is_dir()):
            if not any((path / f"{spec.local_split}{s}").is_file() for s in DATA_SUFFIXES):
                return _read_matharena(path), str(path)
    elif path.name == "answers.csv" and _is_matharena_dir(path.parent):
        return _read_matharena(path.parent), str(path.parent)
    return read_rows(str(path), spec.local_split)


def _read_hub(spec: BenchmarkSpec) -> tuple[list[Any], str]:
    if spec.hub_id is None:
        raise DataError(f"benchmark {spec.name} has no hub dataset; set eval.benchmarks.{spec.name}.path")
    description = f"{spec.hub_id}[{spec.hub_config + ':' if spec.hub_config else ''}{spec.hub_split}]"
    try:
        import datasets

        args = (spec.hub_id, spec.hub_config) if spec.hub_config else (spec.hub_id,)
        rows = list(datasets.load_dataset(*args, split=spec.hub_split))
    except Exception as err:  # noqa: BLE001 -- any hub/network failure becomes one clear line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"cannot load benchmark {spec.name} from the hub ({description}: {first}); "
            f"download it and set eval.benchmarks.{spec.name}.path to the local .jsonl/.json/.parquet"
        ) from None
    return rows, description


def _procedural_rows() -> tuple[list[dict[str, Any]], str]:
    cfg = EmbeddedModelConfig()
    # The test split is drawn before the train split, so n_train=0 gives the shipped test.jsonl.
    _, test = tasks.make_splits(cfg.seed, 0, cfg.n_test, cfg.levels)
    return tasks.rows(test), f"rlspec procedural test split (seed {cfg.seed}, n_test {cfg.n_test})"


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[BenchmarkProblem]:
    """The problems of benchmark ``name``, in file order (the first ``limit`` when given).

    ``path``: a local file (``.jsonl``, ``.json`` array, ``.parquet``), a directory holding
    ``test.jsonl``/``.json``/``.parquet``, or a MathArena directory (``answers.csv`` +
    ``problems/``); ``None`` loads the hub dataset (the procedural split for ``heldout``).
    """
    spec = get_benchmark(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"benchmark {name}: limit must be a positive integer or None, got {limit!r}")
    if path is not None:
        rows, source = _read_local(spec, Path(path).expanduser())
    elif spec.name == "heldout":
        rows, source = _procedural_rows()
    else:
        rows, source = _read_hub(spec)
    if not rows:
        raise DataError(f"benchmark {name}: {source} has no rows")
    if limit is not None:
        rows = rows[:limit]
    return problems_from_rows(spec, rows, source)
