"""A DLER run with rollout.backend=vllm on the embedded default: the rollouts come from vLLM and the
trainer's recomputed log-probs agree with vLLM's (the weights are synced after every step)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.engines, pytest.mark.slow]

from conftest import REPO  # noqa: E402


def test_dler_trains_with_the_vllm_backend(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlspec.train", "+recipe=dler", "rollout.backend=vllm", f"run_dir={run}",
           "trainer.steps=3", "trainer.prompts_per_step=8", "trainer.num_threads=2",
           # one update per step (dler trains 4 mini-batches of 2 prompts here): every ratio is then
           # trainer / vLLM log-prob of the same tokens, the sync check below
           "trainer.mini_batch_size=null",
           "eval.num_problems=16", "eval.samples_per_problem=1", "eval.at_start=false",
           "logger.progress=off", "logger.backends=[jsonl]"]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # trainer.old_logprobs=rollout and one mini-batch: the PPO ratio is trainer / vLLM log-prob of the same
        # sampled tokens, so a stale or mis-cast vLLM model (weights not synced) shows as ratio_max != 1
        print(f"step {r['step']}: ratio_max {r['actor/ratio_max']:.6f} ppo_kl {r['actor/ppo_kl']:.2e} "
              f"tokens/s {r['perf/tokens_per_s']:.0f}")
        assert r["actor/ratio_max"] == pytest.approx(1.0, abs=1e-3)
        assert r["perf/generated_tokens"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["end"]["eval/accuracy"] > 0


def test_deepspeed_ranks_each_sample_with_their_own_vllm_engine(tmp_path):
    """torchrun, 2 ranks, ZeRO-2 + vLLM: every rank runs an engine (external_launcher) that follows
    the DeepSpeed-updated weights (the rollout/trainer ratio stays 1)."""
    import socket

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "rlspec.train", "+recipe=dler", "trainer.strategy=deepspeed", "rollout.backend=vllm",
           f"run_dir={run}", "trainer.steps=2", "trainer.prompts_per_step=8", "rollout.n=4", "trainer.num_threads=1",
           "trainer.mini_batch_size=null",  # one update per step: ratio_max is the rollout/trainer check
           "eval.num_problems=16", "eval.samples_per_problem=1", "eval.at_start=false", "logger.progress=off",
           "logger.backends=[jsonl]"]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        print(f"step {r['step']}: ratio_max {r['actor/ratio_max']:.6f} groups {r['batch/groups_generated']:.0f}")
        assert r["actor/ratio_max"] == pytest.approx(1.0, abs=1e-3)
