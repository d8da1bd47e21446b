"""Benchmark loaders: per-format fixtures, malformed rows, the hub path, the shared files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlspec.errors import ConfigError, DataError
from rlspec.evals.benchmarks import (
    BenchmarkProblem,
    benchmark_names,
    clean_answer,
    get_benchmark,
    gsm8k_answer,
    load_benchmark,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_registry_names():
    assert benchmark_names() == ["aime24", "aime25", "amc23", "gsm8k", "heldout", "math500"]
    assert get_benchmark("math500").hub_id == "HuggingFaceH4/MATH-500"
    assert (get_benchmark("gsm8k").hub_id, get_benchmark("gsm8k").hub_config) == ("openai/gsm8k", "main")
    with pytest.raises(ConfigError, match="math500"):
        load_benchmark("math50")


def test_math500_fixture(tmp_path):
    row = {"problem": " What is $1+1$? ", "solution": "So $\\boxed{2}$.", "answer": "2", "subject": "Algebra",
           "level": 1, "unique_id": "test/algebra/1.json"}
    (got,) = load_benchmark("math500", write_jsonl(tmp_path / "m.jsonl", [row]))
    assert got == BenchmarkProblem(uid="math500/test/algebra/1.json", question="What is $1+1$?", answer="2",
                                   solution="So $\\boxed{2}$.", level=1, subject="Algebra")


def test_aime_json_array_and_question_fallback(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"id": 60, "question": "Q1", "answer": "025"}, {"id": 61, "problem": "Q2", "answer": 7}]))
    got = load_benchmark("aime24", path)
    assert [(p.uid, p.question, p.answer) for p in got] == [("aime24/60", "Q1", "025"), ("aime24/61", "Q2", "7")]


def test_amc_float_answers(tmp_path):
    rows = [{"id": 0, "problem": "a", "answer": 27.0}, {"id": 1, "problem": "b", "answer": 0.5}]
    assert [p.answer for p in load_benchmark("amc23", write_jsonl(tmp_path / "test.jsonl", rows))] == ["27", "0.5"]
    assert clean_answer(-3.0) == "-3"


def test_gsm8k_answers_and_directory(tmp_path):
    rows = [{"question": "How many?", "answer": "2 * 500 = <<2*500=1000>>1000\nSo 1,000 more.\n#### 1,000"},
            {"question": "Loss?", "answer": "#### -5"}]
    write_jsonl(tmp_path / "test.jsonl", rows)
    got = load_benchmark("gsm8k", tmp_path)  # a directory: its test.jsonl
    assert [p.answer for p in got] == ["1000", "-5"]
    assert got[0].solution == "2 * 500 = <<2*500=1000>>1000\nSo 1,000 more."
    assert got[1].solution is None
    assert gsm8k_answer("x\n#### 12.") == ("12", "x")


def test_limit(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    got = load_benchmark("gsm8k", write_jsonl(tmp_path / "g.jsonl", rows), limit=2)
    assert [p.uid for p in got] == ["gsm8k/0", "gsm8k/1"]
    with pytest.raises(DataError, match="limit"):
        load_benchmark("gsm8k", tmp_path / "g.jsonl", limit=0)


def test_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "test.parquet"
    datasets.Dataset.from_list([{"problem": "p", "answer": "\\frac12", "id": 3}]).to_parquet(str(path))
    (got,) = load_benchmark("aime25", path)
    assert (got.uid, got.answer) == ("aime25/3", "\\frac12")


def test_matharena_layout(tmp_path):
    for part, answers in (("aime_2025_I", ["70", "588"]), ("aime_2025_II", ["468"])):
        (tmp_path / part / "problems").mkdir(parents=True)
        (tmp_path / part / "answers.csv").write_text(
            "id,answer\n" + "".join(f"{i},{a}\n" for i, a in enumerate(answers, 1)))
        for i in range(1, len(answers) + 1):
            (tmp_path / part / "problems" / f"{i}.tex").write_text(f"{part} problem {i}\n")
    got = load_benchmark("aime25", tmp_path)
    assert [(p.uid, p.answer) for p in got] == [
        ("aime25/aime_2025_I/1", "70"), ("aime25/aime_2025_I/2", "588"), ("aime25/aime_2025_II/1", "468")]
    assert got[0].question == "aime_2025_I problem 1"
    assert len(load_benchmark("aime25", tmp_path / "aime_2025_II")) == 1
    (tmp_path / "aime_2025_II" / "problems" / "1.tex").unlink()
    with pytest.raises(DataError, match=r"answers.csv:2: problem id '1'"):
        load_benchmark("aime25", tmp_path / "aime_2025_II")


@pytest.mark.parametrize(
    "bench, row, pattern",
    [
        ("math500", {"answer": "1"}, r"row 2: field 'problem' is missing"),
        ("aime24", {"answer": "1"}, r"row 2: field 'problem' is missing \(nor 'question'\)"),
        ("math500", {"problem": 5, "answer": "1"}, r"row 2: field 'problem' is a int, not a string"),
        ("math500", {"problem": "  ", "answer": "1"}, r"row 2: field 'problem' is empty"),
        ("math500", {"problem": "p"}, r"row 2: field 'answer' is missing"),
        ("math500", {"problem": "p", "answer": None}, r"row 2: field 'answer' is missing"),
        ("math500", {"problem": "p", "answer": " "}, r"row 2: field 'answer' is empty"),
        ("amc23", {"problem": "p", "answer": True}, r"row 2: field 'answer' is a boolean"),
        ("amc23", {"problem": "p", "answer": [1]}, r"row 2: field 'answer' is a list"),
        ("gsm8k", {"question": "p", "answer": "no final line"}, r"row 2: field 'answer' has no '#### '"),
        ("gsm8k", {"question": "p", "answer": "work\n####  "}, r"row 2: field 'answer' is empty"),
    ],
)
def test_malformed_row_names_file_index_field(tmp_path, bench, row, pattern):
    good = {"problem": "p", "question": "p", "answer": "#### 1" if bench == "gsm8k" else "1"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError, match=pattern) as err:
        load_benchmark(bench, path)
    assert str(path) in str(err.value)


def test_non_object_row_and_missing_path(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"problem": "p", "answer": "1"}, "oops"]))
    with pytest.raises(DataError, match=r"row 1 is a str, not an object"):
        load_benchmark("math500", path)
    with pytest.raises(DataError, match=r"does not exist; check eval.benchmarks.aime24.path"):
        load_benchmark("aime24", tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_benchmark("aime24", tmp_path / "empty.jsonl")


def test_hub_path_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        return datasets.Dataset.from_list([{"question": "Q", "answer": "work\n#### 1,234"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (got,) = load_benchmark("gsm8k")
    assert calls == [(("openai/gsm8k", "main"), "test")]
    assert got.answer == "1234"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: calls.append((a, split)) or [
        {"problem": "P", "answer": "3", "solution": "s", "level": 2, "subject": "Algebra", "unique_id": "u"}])
    (got,) = load_benchmark("math500")
    assert calls[-1] == (("HuggingFaceH4/MATH-500",), "test")
    assert (got.uid, got.level, got.subject) == ("math500/u", 2, "Algebra")


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"HuggingFaceH4/aime_2024\[train\]: Couldn't reach .*eval.benchmarks.aime24.path"):
        load_benchmark("aime24")


def test_heldout_is_the_embedded_test_split(tmp_path):
    got = load_benchmark("heldout", limit=3)
    assert len(got) == 3 and all(p.uid.startswith("heldout/test-L") and p.answer.lstrip("-").isdigit() for p in got)
    assert all(isinstance(p.level, int) for p in got)
    # a local procedural-format file (question/answer/level/uid) loads the same way
    rows = [{"question": p.question, "answer": p.answer, "level": p.level, "uid": p.uid.split("/", 1)[1]} for p in got]
    assert load_benchmark("heldout", write_jsonl(tmp_path / "test.jsonl", rows)) == got


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@needs_shared
@pytest.mark.parametrize(
    "bench, rel, n, first_answer",
    [
        ("math500", "math500/test.jsonl", 500, r"\left( 3, \frac{\pi}{2} \right)"),
        ("aime24", "aime24/test.jsonl", 30, "204"),
        ("aime25", "aime25/test.jsonl", 30, "70"),
        ("aime25", "aime25/matharena", 30, "70"),
        ("amc23", "amc23/test.jsonl", 40, "27"),
        ("gsm8k", "gsm8k/test.jsonl", 1319, "18"),
    ],
)
def test_shared_files(bench, rel, n, first_answer):
    got = load_benchmark(bench, SHARED_DATA / rel)
    assert len(got) == n == get_benchmark(bench).expected_rows
    assert got[0].answer == first_answer
    assert len({p.uid for p in got}) == n
    if bench == "aime25":
        json_answers = [p.answer for p in load_benchmark("aime25", SHARED_DATA / "aime25/test.jsonl")]
        assert [p.answer for p in got] == json_answers
    if bench == "math500":
        assert all(p.solution and p.level in range(1, 6) and p.subject for p in got)


@needs_shared
@pytest.mark.slow
def test_grader_selfcheck_on_shared_files():
    """bench/grader_selfcheck.py over every shared file: >= 99.5 % of reference answers grade correct."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "grader_selfcheck.py"), "--data", str(SHARED_DATA)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "| math500/test.jsonl [solution] | 500 |" in proc.stdout


def test_grader_selfcheck_script_on_fixture(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import grader_selfcheck as sc
    finally:
        sys.path.remove(str(REPO / "bench"))
    (tmp_path / "amc23").mkdir()
    write_jsonl(tmp_path / "amc23" / "test.jsonl", [{"problem": "p", "answer": 27.0}, {"problem": "q", "answer": 0.5}])
    (result,) = sc.selfcheck(tmp_path, only=["amc23"])
    assert (result.n, result.correct, result.failures) == (2, 2, [])
    bad = sc.run_check("fixture", [sc.Case("u1", sc.as_model_output("3"), "4"), sc.Case("u2", "no box", "4")])
    assert (bad.n, bad.correct) == (2, 0)
    assert bad.failures == [("u1", "extracted '3' not verified equal to gold '4'"),
                            ("u2", "no answer extracted from the response (gold '4')")]
    assert "| fixture | 2 | 0 | 0.00 |" in sc.format_table([bad])
