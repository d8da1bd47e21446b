"""Prompt datasets: the embedded procedural split, local files, or hub datasets.

Every row becomes ``{"question": str, "answer": str, **other columns}``. A malformed row is
reported with its file and index (never silently skipped).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlspec.errors import DataError, ModelLoadError
from rlspec.prompts import KEY, fill, template_text, user_content

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_utf8(path: Path) -> str:
    """A data file's text (a UTF-8 BOM is skipped); bytes that are not UTF-8 raise DataError
    naming the file, line and column instead of a bare UnicodeDecodeError."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); re-save the "
                        f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    text = read_utf8(path)
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err}); fix the file or convert it to JSONL") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({err.msg}); fix or remove that line") from None
    return rows


def _find_split_file(directory: Path, split: str) -> Path:
    for suffix in DATA_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.name for p in directory.iterdir() if p.suffix in DATA_SUFFIXES)) or "none"
    raise DataError(
        f"no {split}.jsonl/.json/.parquet in {directory} (data files there: {names}); "
        f"set the split name or point the path at a file"
    )


def read_rows(source: str, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """Read raw rows from a file, a directory (``{split}.jsonl`` etc.) or a hub dataset id.

    Returns ``(rows, description)``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = _find_split_file(path, split)
    if path.is_file():
        if path.suffix == ".parquet":
            import datasets

            return list(datasets.load_dataset("parquet", data_files=str(path), split="train")), str(path)
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json or .parquet")
        return _read_json_or_jsonl(path), str(path)
    looks_like_path = source.startswith((".", "/", "~")) or Path(source).suffix in DATA_SUFFIXES
    if looks_like_path or source.count("/") > 1:
        raise DataError(f"data file {source!r} does not exist; check data.path / data.test_path")
    # a hub dataset id ("org/name")
    try:
        import datasets

        return list(datasets.load_dataset(source, split=split)), f"{source}[{split}]"
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one clear line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"cannot load dataset {source!r} split {split!r} ({first}); "
            f"no such local file, and the hub is not reachable or has no such dataset -- "
            f"pass a local .jsonl/.json/.parquet path instead"
        ) from None


def normalize_rows(
    rows: list[dict[str, Any]], source: str, question_key: str, answer_key: str
) -> list[dict[str, Any]]:
    """Map each row to ``question``/``answer`` (+ other columns); malformed rows raise DataError."""
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {index} is not an object")
        missing = [k for k in (question_key, answer_key) if k not in row or row[k] is None]
        if missing:
            raise DataError(
                f"{source}: row {index} has no {missing[0]!r} field (fields: {', '.join(sorted(row))}); "
                f"set data.question_key / data.answer_key to the right column"
            )
        question = str(row[question_key]).strip()
        answer = row[answer_key]
        answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()
        answer = gsm8k_final(answer)
        if not question or not answer:
            raise DataError(f"{source}: row {index} has an empty {question_key!r} or {answer_key!r}")
        extra = {k: v for k, v in row.items() if k not in (question_key, answer_key)}
        out.append({**extra, "question": question, "answer": answer})
    return out


THOUSANDS = re.compile(r"-?\$?\d{1,3}(,\d{3})+(\.\d+)?")  # 1,018 / -12,345.5: GSM8K's separators


def gsm8k_final(answer: str) -> str:
    """GSM8K's answer column is the worked solution and a last line ``#### final``: the gold answer is
    the final part (a number's thousands separators dropped, nothing else: ``(1, 2)`` stays a pair),
    as :func:`rlspec.evals.benchmarks.gsm8k_answer` reads it for ``rlspec.eval``; graded against
    the whole solution every answer would be wrong. Any other answer is returned as it is.

    >>> gsm8k_final("16 - 3 - 4 = <<16-3-4=9>>9\\n9 * 2 = <<9*2=18>>18\\n#### 1,018"), gsm8k_final("#### x")
    ('1018', '#### x')
    >>> gsm8k_final("so the pair is\\n#### (1, 2)")
    '(1, 2)'
    """
    solution, mark, final = answer.rpartition("\n#### ")
    final = final.strip()
    if not (mark and solution.strip() and final):
        return answer
    return final.replace(",", "") if THOUSANDS.fullmatch(final) else final


def load_split(source: str, split: str, question_key: str = "question", answer_key: str = "answer") -> list[dict[str, Any]]:
    rows, description = read_rows(source, split)
    if not rows:
        raise DataError(f"{description} is empty")
    return normalize_rows(rows, description, question_key, answer_key)


def build_messages(question: str, instruction: str) -> list[dict[str, str]]:
    """The user turn: the problem followed by the standard reasoning instruction."""
    return [{"role": "user", "content": user_content(question, instruction)}]


def build_prompt_texts(tokenizer: Any, rows: list[dict[str, Any]], instruction: str,
                       template: str = "chat") -> list[str]:
    """The prompt text of every row under ``data.prompt_template`` (:mod:`rlspec.prompts`): the chat
    template with its generation prompt, or a plain template. Training, the held-out eval and
    ``rlspec.eval`` all build prompts here."""
    plain = template_text(template)
    if plain is not None:
        return [fill(plain, r["question"], instruction) for r in rows]
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no "
            f"chat_template, which {KEY}=chat needs; a base model takes a plain template: set "
            f"{KEY}=r1_zero (rlspec.eval: eval.prompt_template=r1_zero; or plain, or a string with {{question}})")
    return [tokenizer.apply_chat_template(build_messages(r["question"], instruction), tokenize=False,
                                          add_generation_prompt=True) for r in rows]


def build_prompt_ids(tokenizer: Any, rows: list[dict[str, Any]], instruction: str,
                     template: str = "chat") -> list[list[int]]:
    """The prompt (:func:`build_prompt_texts`) of every row, as token ids; a plain template gets the
    tokenizer's special tokens (a base model's BOS), the chat template writes its own."""
    texts = build_prompt_texts(tokenizer, rows, instruction, template)
    special = template != "chat"
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def derive_seed(base: int, *parts: int) -> int:
    """A per-(step, chunk) sampling seed, so a resumed run samples exactly what it would have.

    >>> derive_seed(0, 1, 0) == derive_seed(0, 1, 0) != derive_seed(0, 1, 1)
    True
    """
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part * 7919 + 17) % (2**31 - 1)
    return seed


@dataclass
class PromptSampler:
    """Deterministic, resumable stream of training rows: shuffled per epoch with ``seed + epoch``.

    Its whole state is ``(epoch, position)``, saved in checkpoints so a resumed run sees exactly
    the prompts the uninterrupted run would have seen.
    """

    num_rows: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        indices: list[int] = []
        order = self._order(self.epoch)
        while len(indices) < count:
            if self.position >= self.num_rows:
                self.epoch += 1
                self.position = 0
                order = self._order(self.epoch)
            indices.append(order[self.position])
            self.position += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_rows") != self.num_rows:
            raise DataError(
                f"the checkpoint was trained on {state.get('num_rows')} rows but the data now has "
                f"{self.num_rows}; resume with the same data or start a new run (run_name=...)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
