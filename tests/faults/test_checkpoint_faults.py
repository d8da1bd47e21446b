"""Issue 20, rows "latest checkpoint damaged", "tokenizer.json missing from a checkpoint", "disk
full while saving" and "kill -9 during a checkpoint write": manifests, verification with one
warning line and fallback, and a full disk as one line with the previous checkpoint intact."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from faults_cli import FAST, cli, rlspec_lines, start, train_steps, wait_for
from rlspec.errors import CheckpointError
from rlspec.manifest import MANIFEST, verify_checkpoint

# what a resumed run must reproduce (deterministic given the seed; timings are not)
SAME = ("reward/mean", "reward/std", "acc/mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm",
        "actor/entropy", "adv/abs_mean", "batch/groups_kept")


def _config(run_dir: Path, *overrides: str):
    return compose_config([*FAST, f"run_dir={run_dir}", "trainer.steps=3", *overrides])


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run with a checkpoint after every step."""
    from rlspec.session import run

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    run(_config(run_dir))
    return run_dir


@pytest.fixture()
def copy(reference, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:  # same size, other bytes: only the sha256 can tell
    path.write_bytes(bytes((b + 1) % 256 for b in path.read_bytes()))


def _resume(run_dir: Path, *overrides: str):
    from rlspec.session import build_trainer

    trainer = build_trainer(_config(run_dir, *overrides), run_dir)
    return trainer, trainer.maybe_resume()


def test_every_checkpoint_has_a_manifest_of_its_files(reference):
    for step in (1, 2, 3):
        ckpt = _ckpt(reference, step)
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
        assert sorted(files) == on_disk
        assert {"trainer_state.pt", "model/model.safetensors", "model/tokenizer.json", "meta.json"} <= set(files)
        assert all(files[rel]["size"] == (ckpt / rel).stat().st_size for rel in files)
        assert verify_checkpoint(ckpt).ok
    assert not list((reference / "checkpoints").glob("*.tmp-*"))


@pytest.mark.parametrize("damage, file, why", [
    (lambda c: _truncate(c / "model" / "model.safetensors"), "model/model.safetensors", "truncated"),
    (lambda c: (c / "model" / "model.safetensors").unlink(), "model/model.safetensors", "missing"),
    (lambda c: _garbage(c / "trainer_state.pt"), "trainer_state.pt", "sha256"),
    (lambda c: (c / "model" / "tokenizer.json").unlink(), "model/tokenizer.json", "missing"),
], ids=["truncated-weights", "deleted-weights", "garbage-trainer-state", "no-tokenizer"])
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(copy, capsys, damage, file, why):
    damage(_ckpt(copy, 3))
    trainer, resumed = _resume(copy)
    assert resumed == _ckpt(copy, 2) and trainer.global_step == 2
    warnings = rlspec_lines(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("rlspec: warning: skipped damaged checkpoint step_000003 (")
    assert file in warnings[0] and why in warnings[0] and warnings[0].endswith("resuming from step_000002")


def test_an_explicit_damaged_checkpoint_falls_back_to_an_older_one(copy, capsys):
    _truncate(_ckpt(copy, 2) / "model" / "model.safetensors")
    trainer, resumed = _resume(copy, f"trainer.resume={_ckpt(copy, 2)}")
    assert resumed == _ckpt(copy, 1) and trainer.global_step == 1  # never the newer step_000003
    (line,) = rlspec_lines(capsys.readouterr().err)
    assert "step_000002 (model/model.safetensors" in line and line.endswith("resuming from step_000001")


def test_no_checkpoint_that_verifies_is_one_error_naming_the_files(copy):
    for step in (1, 2, 3):
        _truncate(_ckpt(copy, step) / "model" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        _resume(copy)
    message = str(err.value)
    assert "\n" not in message and "trainer.resume=" in message
    assert all(f"step_00000{s} (model/model.safetensors has" in message for s in (1, 2, 3))


def test_checkpoints_without_a_manifest_still_resume(copy, capsys, caplog):
    for step in (1, 2, 3):
        (_ckpt(copy, step) / MANIFEST).unlink()  # written by rlspec before manifests
    with caplog.at_level("DEBUG", logger="rlspec.manifest"):
        trainer, resumed = _resume(copy)
    assert resumed == _ckpt(copy, 3) and trainer.global_step == 3
    assert not rlspec_lines(capsys.readouterr().err)
    assert "has no manifest.json" in caplog.text
    # still checked for completeness: a truncated safetensors or unreadable state falls back
    _truncate(_ckpt(copy, 3) / "model" / "model.safetensors")
    (_ckpt(copy, 2) / "trainer_state.pt").write_bytes(b"not a torch file")
    trainer, resumed = _resume(copy)
    assert resumed == _ckpt(copy, 1)
    (line,) = rlspec_lines(capsys.readouterr().err)
    assert "step_000003 (model/model.safetensors has" in line and "step_000002 (trainer_state.pt cannot be read" in line


def test_a_corrupted_latest_checkpoint_gives_the_uninterrupted_trajectory(reference, copy, capsys):
    from rlspec.session import run

    _truncate(_ckpt(copy, 3) / "model" / "model.safetensors")
    run(_config(copy))
    assert "resuming from step_000002" in capsys.readouterr().err
    want, got = _rows(reference), _rows(copy)
    assert sorted(got) == [1, 2, 3] and train_steps(copy) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in SAME:
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
    final, expected = (load_file(_ckpt(d, 3) / "model" / "model.safetensors") for d in (copy, reference))
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
    assert verify_checkpoint(_ckpt(copy, 3)).ok


def test_export_refuses_a_checkpoint_without_its_tokenizer(copy, tmp_path, capsys):
    from rlspec.export import main

    (_ckpt(copy, 3) / "model" / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main([f"run_dir={copy}", f"out={tmp_path / 'named'}", "checkpoint=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlspec: error: checkpoint=3: step_000003/model/tokenizer.json is missing") and "\n" not in err
    assert not (tmp_path / "named").exists()
    # checkpoint=latest (the default) exports the newest checkpoint that verifies, saying so once
    main([f"run_dir={copy}", f"out={tmp_path / 'latest'}"])
    captured = capsys.readouterr()
    (line,) = rlspec_lines(captured.err)
    assert "step_000003 (model/tokenizer.json is missing" in line and line.endswith("exporting step_000002")
    assert f"exported {_ckpt(copy, 2)}" in captured.out and (tmp_path / "latest" / "tokenizer.json").is_file()


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(copy, monkeypatch):
    trainer, _ = _resume(copy)
    trainer.global_step = 4  # the next checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as err:
        trainer.save()
    message = str(err.value)
    assert "\n" not in message
    assert f"no space left on the device of run_dir={copy} while saving step_000004" in message
    assert " free;" in message and "the previous checkpoint step_000003 is intact" in message
    root = copy / "checkpoints"
    assert not list(root.glob("*.tmp-*")) and not _ckpt(copy, 4).exists()
    assert (root / "latest").read_text().strip() == "step_000003" and verify_checkpoint(_ckpt(copy, 3)).ok


def test_disk_full_through_the_cli_is_one_line(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "trainer.steps=1", patched=("enospc", tmp_path / "unused"))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    lines = rlspec_lines(err)  # (besides transformers' progress bars)
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    assert lines[0].startswith(f"rlspec: error: no space left on the device of run_dir={run_dir} while saving")
    assert "basic_ios" not in err and not list((run_dir / "checkpoints").glob("*.tmp-*"))


def test_kill_9_during_a_checkpoint_write_then_resume(reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    proc = start(run_dir, "trainer.steps=3", patched=("slow_manifest:2", marker))
    wait_for(marker.is_file, proc)
    proc.kill()  # SIGKILL while step_000002.tmp-<pid> is half written
    proc.communicate()
    temp = run_dir / "checkpoints" / marker.read_text()
    assert temp.is_dir() and not _ckpt(run_dir, 2).exists()
    again = cli(run_dir, "trainer.steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {_ckpt(run_dir, 1)}" in again.stdout.replace("\n", "")  # (rich folds long lines)
    assert not temp.exists()  # its writer is dead: removed at start-up
    assert train_steps(run_dir) == [1, 2, 3] and all(verify_checkpoint(_ckpt(run_dir, s)).ok for s in (1, 2, 3))
    want, got = _rows(reference), _rows(run_dir)
    for step in (1, 2, 3):
        for key in ("reward/mean", "acc/mean", "response_length/mean"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)


def test_a_tokenizer_without_tokenizer_json_verifies(tmp_path):
    """Remote-code tokenizers keep their vocabulary in e.g. qwen.tiktoken: a checkpoint of such a
    model must verify (with a manifest, every listed file is checked; without one, any known
    vocabulary file will do) or the run could never resume."""
    from safetensors.torch import save_file

    from rlspec.manifest import verify_checkpoint, write_manifest

    ckpt = tmp_path / "step_000001"
    (ckpt / "model").mkdir(parents=True)
    torch.save({"global_step": 1}, ckpt / "trainer_state.pt")
    (ckpt / "model" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(ckpt / "model" / "model.safetensors"))
    (ckpt / "model" / "qwen.tiktoken").write_text("IQ== 0\n")
    assert verify_checkpoint(ckpt).ok  # no manifest: a known vocabulary file is there
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt).ok
    (ckpt / "model" / "qwen.tiktoken").unlink()
    verdict = verify_checkpoint(ckpt)
    assert not verdict.ok and verdict.reason == "model/qwen.tiktoken is missing"
    (ckpt / "manifest.json").unlink()
    assert "has no vocabulary" in verify_checkpoint(ckpt).reason
