"""Issue 20, row "SIGTERM / SIGINT mid-run": the step finishes, a checkpoint is saved, one line says
how to resume (exit 143 / 130), and the same command resumes; a second signal exits at once."""

import io
import os
import signal
import sys
import time

import pytest

from faults_cli import cli, rlspec_lines, start, train_steps, wait_for
from rlspec import stopping
from rlspec.manifest import verify_checkpoint
from rlspec.stopping import StopOnSignal


def _checkpoints(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_saves_the_step_reached_and_the_same_command_resumes(tiny_model_path, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    args = ("trainer.steps=6", "trainer.save_every=5")  # the schedule alone would save nothing before step 5
    marker = tmp_path / "step4"
    proc = start(run_dir, *args, patched=("hold_step:4", marker))  # step 4 waits for the signal
    wait_for(marker.exists, proc)
    assert train_steps(run_dir) == [1, 2, 3]
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
    marker = tmp_path / "step2"
    # step 2 waits for the first signal, then never finishes: only the second one can end the run
    proc = start(run_dir, "trainer.steps=6", "trainer.save_every=0", patched=("hold_stop:2", marker))
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGINT)
    wait_for(marker.with_name("step2.stopping").exists, proc)  # the first one was handled
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "rlspec: second SIGINT: exiting now without saving" in err and "Traceback" not in err
    assert train_steps(run_dir) == [1]  # step 2 was abandoned
    assert not (run_dir / "checkpoints").exists() or not _checkpoints(run_dir)


# ------------------------------------------------------------------ the handler, in-process
class _Exited(Exception):
    pass


class _Trainer:
    global_step = 3
    stop_requested = None


@pytest.fixture
def no_exit(monkeypatch):
    """``os._exit`` raises instead of ending pytest: the handler's "exit at once" becomes visible."""
    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(stopping.os, "_exit", fake_exit)
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env", [("TORCHELASTIC_RUN_ID", "abc"), ("WORLD_SIZE", "2")], ids=["run_id", "world_size"])
def test_under_torchrun_the_launchers_copy_of_the_signal_is_ignored(no_exit, env, capfd):
    """torchrun forwards the signal to each worker and Ctrl-C reaches the process group too: two
    SIGINTs within milliseconds are one request, not "exit at once without saving"."""
    no_exit.setenv(*env)
    trainer = _Trainer()
    with StopOnSignal() as stopper:
        stopper.trainer = trainer
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy
        assert trainer.stop_requested == "SIGINT" and stopper.exit_code == 130
        with pytest.raises(_Exited, match="143"):  # another signal is a second request
            os.kill(os.getpid(), signal.SIGTERM)
    assert capfd.readouterr().err.count("SIGINT: finishing step 4") == 1


def test_under_torchrun_the_same_signal_later_still_exits_at_once(no_exit, capfd):
    no_exit.setenv("TORCHELASTIC_RUN_ID", "abc")
    no_exit.setattr(stopping, "TORCHRUN_REPEAT_S", 0.05)
    with StopOnSignal() as stopper:
        stopper.trainer = _Trainer()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        with pytest.raises(_Exited, match="130"):
            os.kill(os.getpid(), signal.SIGINT)
    assert "rlspec: second SIGINT: exiting now without saving" in capfd.readouterr().err


def test_without_torchrun_a_repeat_exits_at_once(no_exit):
    with StopOnSignal() as stopper:
        stopper.trainer = _Trainer()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(_Exited, match="143"):
            os.kill(os.getpid(), signal.SIGTERM)


class _BusyStream(io.StringIO):
    """A stream the main thread is writing to when the signal lands: Python's buffered IO raises."""

    def write(self, text):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")


def test_the_handler_writes_to_fd_2_not_through_a_busy_stream(no_exit, capfd):
    no_exit.setattr(sys, "stdout", _BusyStream())
    no_exit.setattr(sys, "stderr", _BusyStream())
    with StopOnSignal() as stopper:
        stopper.trainer = _Trainer()
        stopper._handle(signal.SIGTERM, None)
        with pytest.raises(_Exited):
            stopper._handle(signal.SIGTERM, None)
    err = capfd.readouterr().err.splitlines()
    assert err == ["SIGTERM: finishing step 4, then saving a checkpoint and stopping (send it again to exit at once)",
                   "rlspec: second SIGTERM: exiting now without saving; re-running the same command resumes from "
                   "the last checkpoint"]
