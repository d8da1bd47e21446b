"""Issue 20, row "two starts on the same run_dir": one process per run directory, config.yaml
written only under the lock, and only dead writers' temporary checkpoints removed at start-up."""

import os
import socket
import subprocess
import sys
import time

import pytest

from faults_cli import ENV, rlspec_lines, start, train_steps
from rlspec import run_lock
from rlspec.errors import RunDirBusyError
from rlspec.run_lock import RunLock, remove_stale_temps


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirBusyError) as err:
            RunLock(tmp_path).acquire()
    message = str(err.value)
    assert f"run_dir={tmp_path} is in use" in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    # a holder killed with -9 leaves no stale lock: the kernel drops it with the process
    holder = subprocess.Popen([sys.executable, "-c", f"from rlspec.run_lock import RunLock; import time; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusyError, match=f"pid {holder.pid} "):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):
        pass


def test_only_dead_writers_temporary_checkpoints_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    live = root / f"step_000003.tmp-{os.getppid()}"  # a live process (pytest's parent) writing
    dead = root / f"step_000002.tmp-{_dead_pid()}"
    dead_shards = root / f"step_000002.tmp-{_dead_pid()}-deepspeed"
    old_style = root / "step_000001.tmp-deepspeed"  # rlspec before pids in the name
    dead_latest = root / f".latest.tmp-{_dead_pid()}"
    for folder in (live, dead, dead_shards, old_style):
        (folder / "model").mkdir(parents=True)
    dead_latest.write_text("step_000002")
    removed = remove_stale_temps(root)
    assert sorted(removed) == sorted([dead, dead_shards, old_style, dead_latest])
    assert live.is_dir() and not dead.exists() and not dead_shards.exists() and not dead_latest.exists()


def test_a_start_on_a_held_run_dir_exits_2_and_leaves_config_yaml(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("trainer:\n  seed: 1\n")  # the holder's config
    with RunLock(run_dir):
        proc = start(run_dir, "trainer.seed=7")
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlspec: error: "), lines
    assert f"is in use by another rlspec run (pid {os.getpid()} on {socket.gethostname()}" in lines[0]
    assert (run_dir / "config.yaml").read_text() == "trainer:\n  seed: 1\n"
    assert not (run_dir / "checkpoints").exists()


def test_three_starts_at_once_exactly_one_trains(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    live = root / f"step_000009.tmp-{os.getpid()}"  # this test process "writes" a checkpoint
    dead = root / f"step_000008.tmp-{_dead_pid()}"
    for folder in (live, dead):
        (folder / "model").mkdir(parents=True)
    # the winner holds step 1 until the other two have exited: a slow start cannot come after it
    # has finished (it would resume, train nothing and exit 0)
    marker = tmp_path / "step1"
    procs = [start(run_dir, "trainer.steps=4", patched=("hold_step:1", marker)) for _ in range(3)]
    deadline = time.monotonic() + 300
    while sum(p.poll() is not None for p in procs) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.with_name("step1.go").write_text("")
    results = [(p.pid, p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]
    winners = [r for r in results if r[1] == 0]
    losers = [r for r in results if r[1] != 0]
    assert len(winners) == 1, [(r[1], r[3][-800:]) for r in results]
    winner_pid = winners[0][0]
    for pid, rc, out, err in losers:
        assert rc == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert f"is in use by another rlspec run (pid {winner_pid} on {socket.gethostname()}" in lines[0]
    assert train_steps(run_dir) == [1, 2, 3, 4]  # every step once
    assert not rlspec_lines(winners[0][3])
    assert live.is_dir() and not dead.exists()


def test_a_killed_holders_record_is_not_named_for_the_new_holder(tmp_path, monkeypatch):
    """A holder killed with -9 leaves its record behind; the next holder writes its own just after
    taking the lock, and a start in between must name the new holder, not the dead one."""
    import json

    from rlspec.run_lock import HOLDER_FILE, LOCK_FILE

    dead = _dead_pid()
    (tmp_path / HOLDER_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    # the holder takes the lock, then writes its record only when told: once the start below has
    # read the dead holder's record (no sleep racing the wait)
    code = (f"import json, os, socket, sys\nfrom filelock import FileLock\n"
            f"lock = FileLock({str(tmp_path / LOCK_FILE)!r}); lock.acquire(); print('held', flush=True)\n"
            f"sys.stdin.readline()\nopen({str(tmp_path / HOLDER_FILE)!r}, 'w').write(json.dumps("
            f"{{'pid': os.getpid(), 'host': socket.gethostname()}}))\nsys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=ENV)
    seen_dead = []

    def pid_alive(pid):
        if pid == dead and not seen_dead:  # the start is waiting now: let the holder write its record
            seen_dead.append(pid)
            holder.stdin.write("write\n")
            holder.stdin.flush()
        return real_pid_alive(pid)

    real_pid_alive, real_read_holder = run_lock.pid_alive, run_lock.read_holder
    monkeypatch.setattr(run_lock, "pid_alive", pid_alive)
    # however slow the holder is to write, the start keeps waiting for a live record
    monkeypatch.setattr(run_lock, "read_holder", lambda run_dir, wait_s=2.0: real_read_holder(run_dir, wait_s=120))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
        assert seen_dead == [dead]  # it did see the dead holder's record first
    finally:
        holder.kill()
        holder.wait()
