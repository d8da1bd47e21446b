"""trainer.strategy=deepspeed: ZeRO-2 and ZeRO-3 over 2 CPU processes (gloo) give the single-process
trainer's losses and weights on the same batch, and a torchrun training run checkpoints and resumes."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.engines, pytest.mark.slow]

from conftest import REPO, TINY_OVERRIDES, compose_config  # noqa: E402
from rlspec.session import build_trainer  # noqa: E402

# 16 responses in micro-batches of 6 -> 3 micro-batches per optimizer step: rank 0 gets two, rank 1
# one plus a zero-weighted one (both ranks must run as many forwards/backwards)
OVERRIDES = ["trainer.micro_batch_size=6", "trainer.micro_batch_tokens=null", "trainer.lr=1e-3",
             "trainer.kl_coef=0.01", "trainer.num_threads=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory):
    """A real rollout batch and the single-process trainer's two optimizer steps on it."""
    work = tmp_path_factory.mktemp("ds")
    (work / "overrides.json").write_text(json.dumps(OVERRIDES))
    cfg = compose_config([*TINY_OVERRIDES, f"run_dir={work / 'local'}", *OVERRIDES])
    trainer = build_trainer(cfg, work / "local")
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    batch.advantages = torch.linspace(-1, 1, batch.size)  # non-degenerate advantages
    torch.save(batch, work / "batch.pt")
    steps = [trainer.update_policy(batch, step=s) for s in (1, 2)]
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return work, steps, final


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_matches_single_process(reference, stage):
    work, local_steps, local_final = reference
    _torchrun([str(REPO / "tests" / "engines" / "ds_worker.py"), str(work), str(stage)])
    ds_steps = json.loads((work / f"metrics{stage}.json").read_text())
    for step, (local, ds) in enumerate(zip(local_steps, ds_steps), start=1):
        for key in ("actor/pg_loss", "actor/entropy", "actor/kl", "actor/ppo_kl", "actor/grad_norm"):
            print(f"ZeRO-{stage} step {step} {key}: local {local[key]:.8f} deepspeed {ds[key]:.8f}")
            assert ds[key] == pytest.approx(local[key], rel=1e-4, abs=1e-6), (step, key)
    # the second step's loss is computed after the first update: equal losses mean equal updates
    assert ds_steps[1]["actor/ppo_kl"] != 0.0
    ds_final = torch.load(work / f"final{stage}.pt")
    worst = max(float((ds_final[k] - v).abs().max()) for k, v in local_final.items())
    print(f"ZeRO-{stage}: max |weight difference| after two steps = {worst:.2e}")
    assert worst < 1e-5


def test_torchrun_training_checkpoints_and_resumes(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    base = ["-m", "rlspec.train", *TINY_OVERRIDES, f"run_dir={run}", "eval.at_start=false",
            "trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=2", "trainer.num_threads=1"]
    _torchrun([*base, "trainer.steps=2"])
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "model" / "config.json").is_file()
    assert (ckpt / "deepspeed" / "state").is_dir(), "the ranks' optimizer partitions are in the checkpoint"
    assert len(list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    proc = _torchrun([*base, "trainer.steps=3"])
    assert "resumed from" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "actor/pg_loss" in r}) == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["end"] is not None
    # the checkpoint's gathered HF weights export like a single-process run's
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "rlspec.export", f"run_dir={run}", f"out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000003" / "model")
    for (name, a), b in zip(exported.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


def test_torchrun_ppo_shards_the_critic_like_the_policy_and_resumes(tiny_model_path, tmp_path):
    run = tmp_path / "run"
    base = ["-m", "rlspec.train", *TINY_OVERRIDES, f"run_dir={run}", "+recipe=ppo", "eval.at_start=false",
            "eval.at_end=false", "trainer.prompts_per_step=4", "trainer.mini_batch_size=2",
            "trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=2", "trainer.num_threads=1"]
    _torchrun([*base, "trainer.steps=2"])
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "critic" / "value_model.safetensors").is_file()
    assert len(list((ckpt / "critic_deepspeed" / "state").glob("*optim_states.pt"))) == 2
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    proc = _torchrun([*base, "trainer.steps=3"])
    assert "resumed from" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows if "critic/vf_loss" in r}) == [1, 2, 3]
