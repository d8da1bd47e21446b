"""Fault suite, issue 20 point 5: bad inputs stop the run with one line, before anything generates.

Rows: a user reward that hangs or raises, a 100k-character question and a 3k-character prompt past
the tiny model's 512 positions, non-UTF-8 bytes in a data file, and a model dir whose tokenizer is
missing or does not fit the model (training, ``rlspec.eval``, ``rlspec.export``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from rlspec.data import load_split
from rlspec.errors import DataError, ModelLoadError, TrainingError

FAST = ["eval.at_start=false", "eval.at_end=false", "logger.plot=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# sleeps 20 s: long past reward.custom.timeout_s=1, short enough that the old code fails instead of hanging
HANGING_TRL = "import time\ndef hang(completions, **kwargs):\n    time.sleep(20)\n"
HANGING_VERL = ("import time\ndef hang(data_source, solution_str, ground_truth, extra_info=None):\n"
                "    if extra_info['index'] == 2:\n        time.sleep(20)\n    return 0.0\n")
# a busy loop, and one whose bare except swallows the first timeout signal: the watchdog re-sends it
BUSY_TRL = "def hang(completions, **kwargs):\n    while True:\n        pass\n"
SWALLOWING_TRL = ("import time\ndef hang(completions, **kwargs):\n    try:\n        while True:\n            pass\n"
                  "    except:\n        pass\n    time.sleep(20)\n")
RAISING_VERL = ("def boom(data_source, solution_str, ground_truth, extra_info=None):\n"
                "    if extra_info['index'] == 3:\n        raise ValueError('cannot parse the answer')\n    return 0.0\n")


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def train_cli(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("rlspec.train", *TINY_OVERRIDES, *FAST, f"run_dir={run_dir}", *overrides, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("rlspec: error:")]
    return line


def custom(tmp_path: Path, text: str, name: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return [f"reward.custom.path={path}", f"reward.custom.name={name}"]


def write_rows(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in questions))
    return path


# ------------------------------------------------------------------ user rewards
@pytest.mark.parametrize("text, which", [(HANGING_TRL, "completions 0-15"), (HANGING_VERL, "completion 2 of 16"),
                                         (BUSY_TRL, "completions 0-15"), (SWALLOWING_TRL, "completions 0-15")],
                         ids=["trl", "verl", "busy_loop", "bare_except"])
def test_a_hanging_reward_times_out_naming_step_completion_and_key(make_trainer, tmp_path, text, which):
    """Today: blocks forever (called up to 4x per step with dynamic sampling)."""
    trainer = make_trainer(*FAST, "reward.custom.timeout_s=1", *custom(tmp_path, text, "hang"))
    start = time.monotonic()
    with pytest.raises(TrainingError, match=rf"did not return within reward\.custom\.timeout_s=1 s "
                                            rf"\(training step 1, {which}"):
        trainer.train_step()
    assert time.monotonic() - start < 60


def test_a_raising_reward_is_one_line_naming_step_and_completion(tmp_path):
    """Today: a Hydra traceback without the step or completion index."""
    line = one_error_line(train_cli(tmp_path / "run", "trainer.steps=1", *custom(tmp_path, RAISING_VERL, "boom")))
    assert "boom() in" in line and "raised ValueError: cannot parse the answer" in line
    assert "training step 1, completion 3 of 16" in line


# ------------------------------------------------------------------ prompt lengths
def test_a_100k_character_question_fails_in_seconds(tmp_path):
    """Today: no step after 300 s, ~7 GB of memory, no message."""
    data = write_rows(tmp_path / "long.jsonl", ["What is 1+1?", "What is 1+1? " + "lorem ipsum " * 8400, "2+0?"])
    start = time.monotonic()
    line = one_error_line(train_cli(tmp_path / "run", f"data.path={data}", f"data.test_path={data}", timeout=120))
    assert time.monotonic() - start < 90
    assert f"{data}: row 1 is a prompt of" in line and "512 positions minus rollout.max_response_length=96" in line
    assert "data.overlong_prompts=drop" in line


def test_a_3k_character_prompt_past_512_positions_is_an_error_or_dropped(make_trainer, tmp_path, capsys):
    """Today: trains silently on a prompt past the model's context."""
    short = [f"What is {i}+1?" for i in range(5)]
    data = write_rows(tmp_path / "train.jsonl", [*short[:3], "What is 1+1? " + "x" * 3000, *short[3:]])
    with pytest.raises(DataError, match=rf"{data}: row 3 is a prompt of \d+ tokens, longer than the model's 512 "
                                        rf"positions minus rollout.max_response_length=96 \(416 tokens\)"):
        make_trainer(f"data.path={data}", f"data.test_path={data}")
    trainer = make_trainer(f"data.path={data}", f"data.test_path={data}", "data.overlong_prompts=drop")
    assert [r["question"] for r in trainer.train_rows] == short
    assert max(len(p) for p in trainer.train_prompt_ids) <= 416
    assert f"dropped 1 of 6 rows of {data}" in capsys.readouterr().out
    trainer = make_trainer(f"data.path={data}", f"data.test_path={data}", "data.overlong_prompts=off")
    assert len(trainer.train_rows) == 6  # off: a model that extrapolates past its positions keeps them


def test_rope_scaling_extends_the_positions_the_prompts_must_fit():
    from types import SimpleNamespace

    from rlspec.input_guards import model_positions

    def positions(**config):
        return model_positions(SimpleNamespace(config=SimpleNamespace(**config)))

    assert positions(max_position_embeddings=32768) == 32768
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert positions(max_position_embeddings=32768, rope_scaling=yarn) == 131072  # Qwen2.5's long-context setup
    assert positions(max_position_embeddings=131072, rope_scaling=yarn) == 131072  # already the extended length
    assert positions(max_position_embeddings=None) is None


def test_the_length_schedule_s_longest_response_counts(make_trainer, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", ["What is 1+1? " + "x" * 300, "What is 2+2?"])
    schedule = ["rollout.length_schedule.name=staged",  # 96 tokens at step 0, 480 from step 1
                "++rollout.length_schedule.kwargs={lengths:[96,480],boundaries:[1]}"]
    with pytest.raises(DataError, match=r"row 0 .* minus rollout\.length_schedule=480"):
        make_trainer(f"data.path={data}", f"data.test_path={data}", *schedule)


# ------------------------------------------------------------------ encodings
def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    """Today: a raw UnicodeDecodeError without the file or line."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "What is 1+1?", "answer": "2"}\n{"question": "caf\xe9 + 1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_split(str(path), "train")


# ------------------------------------------------------------------ tokenizers
@pytest.fixture()
def no_tokenizer_dir(tiny_model_path, tmp_path) -> Path:
    """A copy of the tiny model whose tokenizer.json is gone (tokenizer_config.json still there)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_path, model_dir)
    (model_dir / "tokenizer.json").unlink()
    return model_dir


def test_training_on_a_model_dir_without_tokenizer_json_is_an_error(make_trainer, no_tokenizer_dir):
    """Today: training on it exits 0 (every prompt encodes to nothing)."""
    with pytest.raises(ModelLoadError, match=rf"tokenizer of {no_tokenizer_dir} .* encodes a 44-character question "
                                             rf"as 0.*{no_tokenizer_dir}/tokenizer.json is missing"):
        make_trainer(f"model.path={no_tokenizer_dir}", f"data.path={no_tokenizer_dir}")


def test_eval_on_a_model_dir_without_tokenizer_json_exits_2(no_tokenizer_dir, tmp_path):
    """Today: rlspec.eval exits 0 with 0.0% accuracy (1-token prompts, empty outputs)."""
    line = one_error_line(run_cli("rlspec.eval", f"model.path={no_tokenizer_dir}", "eval.benchmarks=[heldout]",
                                  "eval.limit=2", f"out={tmp_path / 'eval'}"))
    assert f"{no_tokenizer_dir}/tokenizer.json is missing" in line
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_export_of_a_checkpoint_whose_tokenizer_does_not_fit_the_model_exits_2(make_trainer, tmp_path):
    """Today: rlspec.export writes whatever tokenizer it finds and exits 0. (A missing
    tokenizer.json is caught by the checkpoint manifest; a tokenizer of another model by this guard.)"""
    from rlspec.manifest import write_manifest

    run_dir = tmp_path / "run"
    trainer = make_trainer(*FAST, run_dir=run_dir)
    checkpoint = trainer.save()
    bigger = trainer.tokenizer
    bigger.add_tokens([f"<extra_{i}>" for i in range(1000)])  # 1415 tokens for 415 embedding rows
    bigger.save_pretrained(checkpoint / "model")
    (checkpoint / "manifest.json").unlink(missing_ok=True)
    write_manifest(checkpoint)  # a consistent checkpoint, just with the wrong tokenizer
    line = one_error_line(run_cli("rlspec.export", f"run_dir={run_dir}", f"out={tmp_path / 'out'}"))
    assert f"the tokenizer of {checkpoint / 'model'} has 1415 tokens but the model's embedding has 415 rows" in line
    assert not (tmp_path / "out").exists()
