"""Issue 20, row "SIGTERM / SIGINT mid-run": the step finishes, a checkpoint is saved, one line says
how to resume (exit 143 / 130), and the same command resumes; a second signal exits at once."""

import signal
import time

import pytest

from faults_cli import cli, rlspec_lines, start, train_steps, wait_for
from rlspec.manifest import verify_checkpoint


def _checkpoints(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_saves_the_step_reached_and_the_same_command_resumes(tiny_model_path, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    args = ("trainer.steps=6", "trainer.save_every=5")  # the schedule alone would save nothing before step 5
    proc = start(run_dir, *args)
    wait_for(lambda: train_steps(run_dir) == [1, 2, 3], proc)  # step 4 is under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-3000:]
    assert _checkpoints(run_dir) == ["step_000004"] and verify_checkpoint(run_dir / "checkpoints" / "step_000004").ok
    (line,) = rlspec_lines(err)
    assert line == (f"rlspec: stopped by {sig.name} after step 4/6; checkpoint {run_dir / 'checkpoints' / 'step_000004'} "
                    f"saved; re-run the same command to resume from it")
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert not (run_dir / "summary.json").exists()  # the run is not finished
    again = cli(run_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert _checkpoints(run_dir) == ["step_000004", "step_000005", "step_000006"]


def test_a_second_signal_exits_at_once_without_saving(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=6", "trainer.save_every=0")
    wait_for(lambda: train_steps(run_dir) == [1], proc)  # step 2 is under way
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals sent back to back can arrive as one
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "rlspec: second SIGINT: exiting now without saving" in err and "Traceback" not in err
    assert train_steps(run_dir) == [1]  # step 2 was abandoned
    assert not (run_dir / "checkpoints").exists() or not _checkpoints(run_dir)
