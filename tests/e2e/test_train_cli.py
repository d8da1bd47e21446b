"""The real CLI end to end on the tiny embedded model: outputs, resume after a kill, one-line errors."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rlspec.train", *args], capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dler_cli_run_writes_everything(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("+recipe=dler", *TINY_OVERRIDES, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    assert "adv_estimator: batch_norm" in (run_dir / "config.yaml").read_text()
    train_steps = [m["step"] for m in _metrics(run_dir) if "reward/mean" in m]
    assert train_steps == [1, 2]
    evals = [m for m in _metrics(run_dir) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "token_change_percent" in summary
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    final = run_dir / "checkpoints" / "step_000002"
    assert (final / "model" / "config.json").is_file() and (final / "trainer_state.pt").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(final / "model")
    assert AutoTokenizer.from_pretrained(final / "model").chat_template
    # a second invocation of a finished run does no work and keeps everything
    again = _cli("+recipe=dler", *TINY_OVERRIDES, f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [m["step"] for m in _metrics(run_dir) if "reward/mean" in m] == [1, 2]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_trajectory(tiny_model_path, tmp_path):
    common = [*TINY_OVERRIDES, "trainer.steps=4", "trainer.save_every=1", "trainer.save_total_limit=10",
              "eval.at_start=false", "eval.at_end=false"]
    reference = tmp_path / "reference"
    proc = _cli("+recipe=dler", *common, f"run_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    child = subprocess.Popen([sys.executable, "-m", "rlspec.train", "+recipe=dler", *common, f"run_dir={interrupted}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (interrupted / "checkpoints" / "step_000002").is_dir():
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = sorted(p.name for p in (interrupted / "checkpoints").glob("step_*"))
    assert "step_000002" in done_before and "step_000004" not in done_before

    proc = _cli("+recipe=dler", *common, f"run_dir={interrupted}", "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    ckpts = sorted(p.name for p in (interrupted / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000001", "step_000002", "step_000003", "step_000004"]
    ref = [m for m in _metrics(reference) if "reward/mean" in m]
    got = [m for m in _metrics(interrupted) if "reward/mean" in m]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("reward/mean", "response_length/mean", "acc/mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
        assert a.get("actor/pg_loss", 0) == pytest.approx(b.get("actor/pg_loss", 0), abs=1e-4)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("rlspec: error: ")
    return lines[0]


def test_wrong_model_path_is_one_clear_line(tmp_path):
    line = _one_error_line(_cli("model.path=/no/such/model", f"run_dir={tmp_path}", "logger.progress=off"))
    assert "model.path='/no/such/model' does not exist" in line


def test_missing_data_file_is_one_clear_line(tiny_model_path, tmp_path):
    line = _one_error_line(_cli("model.embedded_preset=tiny", "data.path=/no/such/train.jsonl", f"run_dir={tmp_path}"))
    assert "/no/such/train.jsonl" in line and "does not exist" in line


def test_malformed_data_row_names_the_row(tiny_model_path, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n')
    line = _one_error_line(_cli("model.embedded_preset=tiny", f"data.path={data}", f"data.test_path={data}", f"run_dir={tmp_path}/run"))
    assert "row 1" in line and "'question'" in line
