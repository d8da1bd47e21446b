"""The benchmark runner and ``python -m rlspec.eval`` on the tiny embedded model."""

import json

import pytest
import torch

from rlspec.errors import ConfigError, ModelLoadError
from rlspec.evals.benchmarks import load_benchmark
from rlspec.evals.runner import SAMPLER_VERSION, RunnerSettings, evaluate_benchmark, problem_streams, read_records

torch.set_num_threads(1)

SETTINGS = dict(samples=2, max_new_tokens=12, max_batch_size=8)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from rlspec.models import eos_token_ids, load_causal_lm, load_tokenizer
    from rlspec.rollout.native import NativeEngine

    tokenizer = load_tokenizer(str(tiny_model_path))
    model = load_causal_lm(str(tiny_model_path))
    engine = NativeEngine(model, eos_token_ids(model, tokenizer), tokenizer=tokenizer, max_batch_size=8)
    return model, tokenizer, engine


class Counting:
    """An engine wrapper that counts generate calls and the prompts it was given."""

    def __init__(self, engine):
        self.engine = engine
        self.eos_token_ids = engine.eos_token_ids
        self.calls = 0
        self.prompts = 0

    def generate(self, prompt_ids, params):
        self.calls += 1
        self.prompts += len(prompt_ids)
        return self.engine.generate(prompt_ids, params)


class Stop(Exception):
    pass


def test_runner_end_to_end_heldout(tiny, tmp_path):
    model, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=3)
    counting = Counting(engine)
    result = evaluate_benchmark(counting, tokenizer, problems, RunnerSettings(**SETTINGS), tmp_path, progress=False)
    assert counting.calls == 1 and counting.prompts == 6  # the 3 problems x 2 samples batched in one call
    lines = (tmp_path / "heldout.jsonl").read_text().splitlines()
    by_uid = {json.loads(line)["uid"]: json.loads(line) for line in lines}
    assert len(lines) == 3 and set(by_uid) == {p.uid for p in problems}
    assert [r["prompt_tokens"] for r in map(json.loads, lines)] == sorted(r["prompt_tokens"] for r in by_uid.values())
    assert [r["uid"] for r in result["records"]] == [p.uid for p in problems]
    for p in problems:
        rec = by_uid[p.uid]
        assert rec["gold"] == p.answer and rec["seed"] == 1234 and rec["streams"] == list(problem_streams(p.uid, 2))
        assert rec["sampler"] == SAMPLER_VERSION
        assert rec["settings"]["samples"] == 2 and rec["settings"]["temperature"] == 0.6
        assert rec["settings"]["top_p"] == 0.95 and "boxed" in rec["settings"]["instruction"]
        assert len(rec["samples"]) == 2
        for s in rec["samples"]:
            assert 1 <= s["tokens"] <= 12 and s["finish_reason"] in ("stop", "length")
            assert isinstance(s["text"], str) and isinstance(s["correct"], bool)
    # the metrics are those of the file's samples
    verdicts = [[s["correct"] for s in json.loads(line)["samples"]] for line in lines]
    assert result["metrics"]["pass@1"] == pytest.approx(sum(map(sum, verdicts)) / 6)
    tokens = [s["tokens"] for line in lines for s in json.loads(line)["samples"]]
    assert result["metrics"]["mean_tokens"] == pytest.approx(sum(tokens) / 6)
    assert result["generated"] == 3 and result["settings"]["max_new_tokens"] == 12

    # a problem's samples do not depend on which other problems are evaluated (nor on batching)
    alone = evaluate_benchmark(model, tokenizer, problems[1:2], RunnerSettings(**SETTINGS), tmp_path / "alone",
                               progress=False)
    assert alone["records"][0]["samples"] == result["records"][1]["samples"]


def test_runner_resumes_without_regenerating(tiny, tmp_path):
    _, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=4)
    settings = RunnerSettings(**SETTINGS)
    full = evaluate_benchmark(engine, tokenizer, problems, settings, tmp_path / "full", progress=False)

    counting = Counting(engine)
    seen = []

    def stop_after_two(record):
        seen.append(record["uid"])
        if len(seen) == 2:
            raise Stop  # the run is killed after writing two problems

    with pytest.raises(Stop):
        evaluate_benchmark(counting, tokenizer, problems, settings, tmp_path / "run", progress=False,
                           on_problem=stop_after_two)
    assert counting.calls == 1  # 4 problems x 2 samples: one call of max_batch_size=8 rows
    path = tmp_path / "run" / "heldout.jsonl"
    with open(path, "a") as f:
        f.write('{"uid": "heldout/half-writ')  # a write cut off by the kill
    counting.calls = counting.prompts = 0
    resumed = evaluate_benchmark(counting, tokenizer, problems, settings, tmp_path / "run", progress=False)
    assert counting.calls == 1 and counting.prompts == 4  # only the two unfinished problems
    assert resumed["generated"] == 2
    assert resumed["records"] == full["records"]  # per-row streams: same samples as an uninterrupted run
    assert path.read_text() == (tmp_path / "full" / "heldout.jsonl").read_text()
    assert json.dumps(resumed["metrics"]) == json.dumps(full["metrics"])  # (NaN-safe equality)
    assert len(path.read_text().splitlines()) == 4

    counting.calls = 0
    again = evaluate_benchmark(counting, tokenizer, problems, settings, tmp_path / "run", progress=False)
    assert counting.calls == 0 and json.dumps(again["metrics"]) == json.dumps(full["metrics"])

    with pytest.raises(ConfigError, match="other eval settings"):
        evaluate_benchmark(counting, tokenizer, problems, RunnerSettings(**{**SETTINGS, "max_new_tokens": 13}),
                           tmp_path / "run", progress=False)
    assert set(read_records(path)) == {p.uid for p in problems}


class Scripted:
    """An engine that answers with scripted texts (one list per call, in row order), to check grading + metrics."""

    def __init__(self, tokenizer, texts_per_call):
        from rlspec.rollout.base import RolloutResult

        self.tokenizer, self.script, self.eos_token_ids = tokenizer, list(texts_per_call), [tokenizer.eos_token_id]
        self.result_type = RolloutResult

    def generate(self, prompt_ids, params):
        texts = self.script.pop(0)
        ids = [self.tokenizer.encode(t, add_special_tokens=False) + [self.tokenizer.eos_token_id] for t in texts]
        return self.result_type(prompt_ids=[list(p) for p in prompt_ids], response_ids=ids,
                                response_logprobs=[torch.zeros(len(i)) for i in ids],
                                finish_reasons=(["stop", "length", "stop"] * len(ids))[: len(ids)])


def test_runner_grades_and_scores_scripted_answers(tiny, tmp_path):
    _, tokenizer, _ = tiny
    problems = load_benchmark("heldout", limit=2)
    a0, a1 = problems[0].answer, problems[1].answer
    script = [[  # one call: both problems' samples
        f"<think>x</think> \\boxed{{{a0}}}", "\\boxed{123456}", "\\boxed{123456}",  # 1/3 right, vote wrong
        f"\\boxed{{{a1}}}", "no box", f"\\boxed{{ {a1} }}",  # 2/3 right, vote right
    ]]
    result = evaluate_benchmark(Scripted(tokenizer, script), tokenizer, problems,
                                RunnerSettings(samples=3, max_new_tokens=64), tmp_path, progress=False)
    m = result["metrics"]
    assert [s["correct"] for s in result["records"][0]["samples"]] == [True, False, False]
    assert [s["answer"] for s in result["records"][1]["samples"]] == [a1, None, a1]
    assert m["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    # pass@3 with n = 3: 1 for any problem with a correct sample
    assert m["pass@3"] == pytest.approx(1.0)
    assert m["maj@3"] == pytest.approx(0.5)
    assert m["truncation_rate"] == pytest.approx(2 / 6)  # the scripted finish reasons: stop, length, stop


def test_shared_seeding_matches_training_heldout_eval(tiny, tmp_path):
    """seeding=shared reproduces rlspec.evals.heldout.evaluate (the trainer's eval) sample for sample."""
    from rlspec.config import EvalConfig
    from rlspec.data import build_prompt_ids
    from rlspec.evals.heldout import evaluate

    _, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=3)
    rows = [{"question": p.question, "answer": p.answer, "uid": p.uid, "level": p.level} for p in problems]
    instruction = RunnerSettings().instruction
    reference = evaluate(engine, tokenizer, rows, build_prompt_ids(tokenizer, rows, instruction),
                         EvalConfig(samples_per_problem=2, max_new_tokens=12, seed=7), engine.eos_token_ids,
                         out_path=tmp_path / "ref.jsonl")
    ours = evaluate_benchmark(engine, tokenizer, problems, RunnerSettings(**SETTINGS, seed=7, seeding="shared"),
                              tmp_path, progress=False)
    ref_samples = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    our_samples = [s for r in ours["records"] for s in r["samples"]]
    assert [s["response"] for s in ref_samples] == [s["text"] for s in our_samples]
    assert ours["metrics"]["pass@1"] == pytest.approx(reference["eval/accuracy"])
    assert ours["metrics"]["mean_tokens"] == pytest.approx(reference["eval/mean_tokens"])
    assert ours["metrics"]["truncation_rate"] == pytest.approx(reference["eval/truncation_rate"])


def _samples_by_uid(result):
    return {r["uid"]: r["samples"] for r in result["records"]}


def test_per_problem_samples_are_the_same_alone_batched_and_at_any_call_size(tiny, tmp_path):
    """per_problem: every row has its own stream (problem uid, sample), so a problem's samples are
    bit-identical generated alone, batched with others, one problem per call, in another order and
    on an engine of another batch size."""
    model, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=5)
    settings = dict(samples=2, max_new_tokens=24, max_batch_size=8)  # T=0.6, top-p 0.95: the protocol's
    counting = Counting(engine)
    batched = evaluate_benchmark(counting, tokenizer, problems, RunnerSettings(**settings, call_rows=16),
                                 tmp_path / "batched", progress=False)
    assert counting.calls == 1 and counting.prompts == 10
    ref = _samples_by_uid(batched)
    texts = [s["text"] for samples in ref.values() for s in samples]
    assert len(set(texts)) >= 8  # real samples: the two samples of a problem differ too
    for i, problem in enumerate(problems):
        alone = evaluate_benchmark(engine, tokenizer, [problem], RunnerSettings(**settings), tmp_path / f"alone{i}",
                                   progress=False)
        assert alone["records"][0]["samples"] == ref[problem.uid]
    counting.calls = 0
    one_each = evaluate_benchmark(counting, tokenizer, problems[::-1], RunnerSettings(**settings, call_rows=1),
                                  tmp_path / "one", progress=False)  # the old one-problem-per-call batching
    assert counting.calls == 5 and _samples_by_uid(one_each) == ref
    narrow = evaluate_benchmark(model, tokenizer, problems[1:4], RunnerSettings(**{**settings, "max_batch_size": 3}),
                                tmp_path / "narrow", progress=False)  # a new engine decoding 3 rows at a time
    assert _samples_by_uid(narrow) == {p.uid: ref[p.uid] for p in problems[1:4]}


def test_shared_seeding_is_keyed_by_position_and_resumes_to_the_same_file(tiny, tmp_path):
    _, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=4)
    settings = RunnerSettings(**SETTINGS, seeding="shared", call_rows=4)
    full = evaluate_benchmark(engine, tokenizer, problems, settings, tmp_path / "full", progress=False)
    assert full["records"][2]["streams"] == [4, 5]  # position 2 x 2 samples + sample
    one_call = evaluate_benchmark(engine, tokenizer, problems, RunnerSettings(**SETTINGS, seeding="shared"),
                                  tmp_path / "one", progress=False)  # call_rows = max_batch_size = 8: one call
    assert _samples_by_uid(one_call) == _samples_by_uid(full)
    written = []

    def stop_after_two(record):
        written.append(record["uid"])
        if len(written) == 2:
            raise Stop

    with pytest.raises(Stop):
        evaluate_benchmark(engine, tokenizer, problems, settings, tmp_path / "run", progress=False,
                           on_problem=stop_after_two)
    resumed = evaluate_benchmark(engine, tokenizer, problems, settings, tmp_path / "run", progress=False)
    assert resumed["generated"] == 2 and resumed["records"] == full["records"]
    assert (tmp_path / "run" / "heldout.jsonl").read_text() == (tmp_path / "full" / "heldout.jsonl").read_text()
    per_problem = evaluate_benchmark(engine, tokenizer, problems, RunnerSettings(**SETTINGS), tmp_path / "pp",
                                     progress=False)
    assert _samples_by_uid(per_problem) != _samples_by_uid(full)  # the key decides the numbers


def test_heldout_eval_does_not_depend_on_num_problems_or_batch_size(tiny, tmp_path):
    from rlspec.config import EvalConfig
    from rlspec.data import build_prompt_ids
    from rlspec.evals.heldout import evaluate
    from rlspec.rollout.native import NativeEngine

    model, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=4)
    rows = [{"question": p.question, "answer": p.answer, "uid": p.uid, "level": p.level} for p in problems]
    prompts = build_prompt_ids(tokenizer, rows, RunnerSettings().instruction)
    settings = EvalConfig(samples_per_problem=2, max_new_tokens=16, seed=3)

    def responses(eng, n, name):
        evaluate(eng, tokenizer, rows[:n], prompts[:n], settings, engine.eos_token_ids, out_path=tmp_path / name)
        return [json.loads(line)["response"] for line in (tmp_path / name).read_text().splitlines()]

    four = responses(engine, 4, "four.jsonl")
    narrow = NativeEngine(model, engine.eos_token_ids, tokenizer=tokenizer, max_batch_size=3)
    assert responses(narrow, 2, "two.jsonl") == four[:4]
    assert len(set(four)) >= 6


def test_results_of_the_earlier_sampler_are_not_mixed_in(tiny, tmp_path):
    _, tokenizer, engine = tiny
    problems = load_benchmark("heldout", limit=2)
    settings = RunnerSettings(**SETTINGS)
    evaluate_benchmark(engine, tokenizer, problems[:1], settings, tmp_path, progress=False)
    path = tmp_path / "heldout.jsonl"
    old = json.loads(path.read_text())
    del old["sampler"], old["streams"]  # a line as the one-seed-per-problem runner wrote it
    path.write_text(json.dumps(old) + "\n")
    with pytest.raises(ConfigError, match="earlier rlspec.eval .*sampler version 1, now 2"):
        evaluate_benchmark(engine, tokenizer, problems, settings, tmp_path, progress=False)


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match="eval.samples"):
        RunnerSettings(samples=0)
    with pytest.raises(ConfigError, match="eval.seeding"):
        RunnerSettings(seeding="global")
    with pytest.raises(ConfigError, match="eval.call_rows"):
        RunnerSettings(call_rows=-1)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tiny_model_path, tmp_path, capsys):
    from rlspec.eval import main

    out = tmp_path / "eval"
    main([f"model.path={tiny_model_path}", "eval.benchmarks=[heldout]", "eval.samples=2", "eval.max_new_tokens=12",
          "eval.limit=2", f"out={out}", "progress=off"])
    summary = json.loads((out / "summary.json").read_text())
    m = summary["benchmarks"]["heldout"]["metrics"]
    assert m["num_problems"] == 2 and m["num_samples"] == 4
    for key in ("pass@1", "pass@2", "maj@2", "mean_tokens", "mean_tokens_correct", "mean_tokens_incorrect",
                "truncation_rate"):
        assert key in m
    assert summary["settings"]["samples"] == 2 and summary["settings"]["max_new_tokens"] == 12
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 2
    table = (out / "summary.md").read_text()
    assert "| heldout | 2 |" in table and "pass@2" in table
    assert "| heldout | 2 |" in capsys.readouterr().out

    # AES against a named base result (hand-written base summary): O1-Pruner with eta=1, zeta=3, gamma=5
    base = tmp_path / "base"
    base.mkdir()
    base_m = {"pass@1": 0.5, "mean_tokens": 2 * m["mean_tokens"]}
    (base / "summary.json").write_text(json.dumps({"benchmarks": {"heldout": {"metrics": base_m}}}))
    main([f"model.path={tiny_model_path}", "eval.benchmarks=[heldout]", "eval.samples=2", "eval.max_new_tokens=12",
          "eval.limit=2", f"out={out}", f"eval.base={base}", "progress=off"])
    d_len = 0.5  # (2L - L) / 2L
    d_acc = (m["pass@1"] - 0.5) / 0.5
    expected = d_len + 3 * d_acc if d_acc >= 0 else d_len - 5 * abs(d_acc)
    again = json.loads((out / "summary.json").read_text())["benchmarks"]["heldout"]
    assert again["generated"] == 0  # resumed from heldout.jsonl
    assert again["aes"] == pytest.approx(expected)
    assert "AES vs base" in (out / "summary.md").read_text()


def test_cli_local_benchmark_file(tiny_model_path, tmp_path):
    from rlspec.eval import parse_args, run_eval

    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2", "unique_id": "a"}) + "\n")
    opts = parse_args([f"model.path={tiny_model_path}", "eval.benchmarks=[math500]", f"eval.benchmarks.math500.path={data}",
                       "eval.samples=1", "eval.max_new_tokens=8", f"out={tmp_path / 'o'}", "progress=off"])
    summary = run_eval(opts)
    assert summary["benchmarks"]["math500"]["metrics"]["num_problems"] == 1
    rec = json.loads((tmp_path / "o" / "math500.jsonl").read_text())
    assert rec["uid"] == "math500/a" and rec["gold"] == "2"


@pytest.mark.parametrize(
    "args, match",
    [
        (["eval.sample=2"], r"unknown config key 'eval.sample' \(did you mean 'eval.samples'\?\)"),
        (["eval.samples=two"], "eval.samples must be an integer"),
        (["eval.samples=0"], "eval.samples must be an integer >= 1"),
        (["eval.benchmarks=[math5000]"], "unknown benchmark 'math5000'"),
        (["eval.benchmarks=[heldout]", "eval.benchmarks.math500.path=x"], "eval.benchmarks.math500.path is set"),
        (["eval.top_p=1.5"], "eval.top_p"),
        (["eval.limit=0"], "eval.limit must be >= 1"),
        (["progress=maybe"], "progress='maybe' is not valid"),
        (["model.path"], "not key=value"),
    ],
)
def test_cli_bad_arguments(args, match):
    from rlspec.eval import parse_args

    with pytest.raises(ConfigError, match=match):
        parse_args(args)


def test_cli_missing_model_path(tmp_path, capsys):
    from rlspec.eval import main, parse_args, run_eval

    with pytest.raises(ModelLoadError, match="model.path="):
        run_eval(parse_args([f"model.path={tmp_path / 'nope'}", "eval.limit=1", f"out={tmp_path / 'o'}"]))
    with pytest.raises(SystemExit) as exc:
        main([f"model.path={tmp_path / 'nope'}", f"out={tmp_path / 'o'}"])
    assert exc.value.code == 2 and "model.path=" in capsys.readouterr().err


def test_cli_several_models_table_and_plot(tiny_model_path, tmp_path, capsys):
    import shutil

    from rlspec.eval import main

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_path, other)
    out = tmp_path / "cmp"
    main([f"model.path=[{tiny_model_path},{other}]", "eval.benchmarks=[heldout]", "eval.samples=1",
          "eval.max_new_tokens=8", "eval.limit=2", f"out={out}", "progress=off"])
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if "| heldout |" in line]
    assert len(rows) == 2 and any("other-model" in r for r in rows)
    # the same weights and settings give the same numbers in both rows
    assert rows[0].split("|")[3:] == rows[1].split("|")[3:]
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "other-model" / "summary.json").is_file()
    assert "compare.md" in capsys.readouterr().out


def test_gsm8k_grades_the_last_number_when_there_is_no_box(tiny, tmp_path):
    from rlspec.evals.benchmarks import BenchmarkProblem

    _, tokenizer, _ = tiny
    problems = [BenchmarkProblem(uid="gsm8k/0", question="2+5?", answer="7")]
    script = [["<think>x</think> so 7 in total", "<think>x</think> so 8", "<think>x</think> \\boxed{7}"]]
    settings = RunnerSettings(samples=3, max_new_tokens=64)
    gsm = evaluate_benchmark(Scripted(tokenizer, [list(script[0])]), tokenizer, problems, settings, tmp_path / "g",
                             progress=False, benchmark="gsm8k")
    assert [s["correct"] for s in gsm["records"][0]["samples"]] == [True, False, True]
    assert [s["answer"] for s in gsm["records"][0]["samples"]] == ["7", "8", "7"]
    # other benchmarks need the box
    other = evaluate_benchmark(Scripted(tokenizer, [list(script[0])]), tokenizer, problems, settings, tmp_path / "m",
                               progress=False, benchmark="math500")
    assert [s["correct"] for s in other["records"][0]["samples"]] == [False, False, True]



def test_last_number_fallback_setting_overrides_the_benchmark_convention(tiny, tmp_path):
    from rlspec.evals.benchmarks import BenchmarkProblem

    _, tokenizer, _ = tiny
    problems = [BenchmarkProblem(uid="p/0", question="2+5?", answer="7")]
    script = ["<think>x</think> so 7 in total", "<think>x</think> so 8", "<think>x</think> \\boxed{7}"]

    def verdicts(benchmark, fallback, out):
        settings = RunnerSettings(samples=3, max_new_tokens=64, last_number_fallback=fallback)
        result = evaluate_benchmark(Scripted(tokenizer, [list(script)]), tokenizer, problems, settings,
                                    tmp_path / out, progress=False, benchmark=benchmark)
        return [s["correct"] for s in result["records"][0]["samples"]]

    assert verdicts("math500", True, "m") == [True, False, True]  # a model that does not box, on any benchmark
    assert verdicts("gsm8k", False, "g") == [False, False, True]  # strict: only the box
    # the default (null) keeps the fingerprint of results written before the key existed
    assert RunnerSettings().fingerprint() == RunnerSettings(last_number_fallback=None).fingerprint()
    assert RunnerSettings().fingerprint() != RunnerSettings(last_number_fallback=True).fingerprint()


def test_default_out_dir_keeps_the_dots_of_model_names():
    """runs/eval/<name>: a hub id's or dir's last part whole (two models that differ after a dot
    must not share a results dir and resume each other's samples); a GGUF file without .gguf."""
    from types import SimpleNamespace

    from rlspec.eval import default_out_name

    def name(path, gguf_file=None):
        return default_out_name(SimpleNamespace(path=path, gguf_file=gguf_file, embedded_preset="default"))

    assert name("Qwen/Qwen2.5-Math-1.5B") == "Qwen2.5-Math-1.5B"
    assert name("Qwen/Qwen2.5-Math-1.5B-Instruct") == "Qwen2.5-Math-1.5B-Instruct"
    assert name("/models/DeepSeek-R1-Distill-Qwen-1.5B/") == "DeepSeek-R1-Distill-Qwen-1.5B"
    assert name("/models/smollm2-135m-instruct.Q8_0.gguf") == "smollm2-135m-instruct.Q8_0"
    assert name("/models/dir", "gemma-3-270m.gguf") == "gemma-3-270m"
    assert name(None) == "embedded-default"
