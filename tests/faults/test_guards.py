"""Fault suite, issue 20 point 4 and issue 19 point 4: divergence and no-learning guards.

Each test reproduces a row of issue 20's table (``trainer.lr=1e6/1e20/1e38``, ``rollout.n=1``) or
issue 19's silent no-learning, and checks the new behaviour: one clear line, no bad checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config
from rlspec.errors import ConfigError, TrainingError
from rlspec.trainers.guards import DivergenceGuard, NoLearningGuard, weight_norm

FAST = ["eval.at_start=false", "eval.at_end=false", "logger.plot=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# a TRL-style reward that differs within every group, so step 1 already updates the policy
VARIED_REWARD = "def varied(completions, **kwargs):\n    return [float(len(c) % 5) for c in completions]\n"


def reward_file(tmp_path: Path, text: str, name: str = "rewards.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def varied(tmp_path: Path) -> list[str]:
    return [f"reward.custom.path={reward_file(tmp_path, VARIED_REWARD)}", "reward.custom.name=varied"]


def train_cli(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlspec.train", *TINY_OVERRIDES, *FAST, f"run_dir={run_dir}",
                           *overrides], capture_output=True, text=True, timeout=timeout, env=ENV)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("rlspec: error:")]


def checkpoint_steps(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []


# ------------------------------------------------------------------ divergence: trainer.lr rows
def test_lr_1e6_stops_with_one_line_before_a_bad_checkpoint(tmp_path, tiny_model_path):
    """Today: exit 0, the model wrecked after step 1, absurd finite checkpoints written."""
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, "trainer.lr=1e6", "trainer.steps=3", "trainer.save_every=1", *varied(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "divergence at step 1" in line and "trainer.lr" in line and "trainer.grad_clip" in line
    assert "Traceback" not in proc.stderr
    assert checkpoint_steps(run_dir) == []  # nothing of the wrecked model was written


@pytest.mark.parametrize("lr, what", [("1e20", "weight norm"), ("1e38", "overflowed")])
def test_lr_1e20_and_1e38_stop_at_the_first_update(make_trainer, tmp_path, lr, what):
    """Today: 1e20 crashes with an index error in sampling, 1e38 with a raw overflow in Adam."""
    trainer = make_trainer(f"trainer.lr={lr}", "trainer.steps=2", *FAST, *varied(tmp_path))
    with pytest.raises(TrainingError, match=rf"divergence at step 1: .*{what}.*trainer\.lr.*trainer\.grad_clip"):
        trainer.fit()
    assert trainer.global_step == 0 and checkpoint_steps(tmp_path) == []


def test_normal_lr_passes_the_divergence_guard(make_trainer, tmp_path):
    trainer = make_trainer("trainer.steps=2", *FAST, *varied(tmp_path))
    before = weight_norm(trainer.model)
    trainer.fit()
    assert trainer.global_step == 2 and weight_norm(trainer.model) != before  # it did learn


def test_gradient_norm_spike_and_ceiling_stop_the_run():
    model = torch.nn.Linear(4, 4)
    cfg = compose_config([*TINY_OVERRIDES, "trainer.divergence.spike_warmup=3",
                          "trainer.divergence.grad_norm_spike=100", "trainer.divergence.max_grad_norm=1e6"])
    guard = DivergenceGuard(cfg.trainer)
    for step, grad in enumerate([0.5, 0.0, 1.2, 0.4, 3.0], start=1):  # normal variation, zeros skipped
        with guard.watch(model, {"actor/grad_norm": grad}, step):
            pass
    with pytest.raises(TrainingError, match=r"step 6: .*gradient norm .*running median.*trainer\.lr"):
        with guard.watch(model, {"actor/grad_norm": 500.0}, 6):
            pass
    with pytest.raises(TrainingError, match=r"max_grad_norm=1e\+06"):
        with guard.watch(model, {"actor/grad_norm": 2e6}, 7):
            pass


def test_updates_without_advantages_do_not_lower_the_spike_median():
    """A hard task's early steps (every advantage zero, a KL-only gradient of ~1e-4) must not make
    the first real update (~1) look like a 1000x spike."""
    model = torch.nn.Linear(4, 4)
    cfg = compose_config([*TINY_OVERRIDES, "trainer.divergence.spike_warmup=3", "trainer.divergence.grad_norm_spike=100"])
    guard = DivergenceGuard(cfg.trainer)
    for step, grad in enumerate([0.8, 1.1, 0.9], start=1):
        with guard.watch(model, {"actor/grad_norm": grad}, step):
            pass
    for step in range(4, 20):  # KL-only updates
        with guard.watch(model, {"actor/grad_norm": 1e-4}, step, informative=False):
            pass
    with guard.watch(model, {"actor/grad_norm": 1.5}, 20):  # a real update: no stop
        pass


def test_weight_norm_of_huge_weights_without_a_float64_copy():
    model = torch.nn.Linear(100, 100).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1e20)
    assert math.isfinite(weight_norm(model)) and weight_norm(model) == pytest.approx(1e22, rel=1e-2)


def test_non_finite_weights_after_an_update_stop_the_run():
    model = torch.nn.Linear(4, 4)
    guard = DivergenceGuard(compose_config(TINY_OVERRIDES).trainer)
    with pytest.raises(TrainingError, match="not finite"):
        with guard.watch(model, {"actor/grad_norm": 1.0}, 3):
            with torch.no_grad():
                model.weight[0, 0] = math.inf


# ------------------------------------------------------------------ non-finite state refused at save
def test_non_finite_weights_refuse_the_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(*FAST)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(TrainingError, match=r"refusing to write the checkpoint of step 0: the policy's .* not finite"):
        trainer.save()
    assert checkpoint_steps(tmp_path) == []


def test_non_finite_optimizer_state_refuses_the_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer("trainer.steps=1", *FAST, *varied(tmp_path))
    trainer.train_step()
    state = next(iter(trainer.strategy.optimizer.state.values()))
    state["exp_avg_sq"].view(-1)[0] = math.inf
    with pytest.raises(TrainingError, match=r"step 1: the policy's optimizer state .*exp_avg_sq is not finite"):
        trainer.save()
    assert checkpoint_steps(tmp_path) == []


# ------------------------------------------------------------------ rollout.n >= 2
@pytest.mark.parametrize("overrides, why", [
    (["+recipe=dler"], "trainer.filter_groups"),
    (["trainer.adv_estimator=grpo"], "trainer.adv_estimator=grpo"),
    (["trainer.adv_estimator=dr_grpo"], "trainer.adv_estimator=dr_grpo"),
])
def test_rollout_n_1_is_a_config_error_for_group_estimators(overrides, why):
    """Today: dler keeps 0 groups every step and exits 0; grpo silently becomes REINFORCE."""
    with pytest.raises(ConfigError, match=rf"^rollout\.n=1: {why}.*set rollout\.n=2 or more"):
        compose_config([*TINY_OVERRIDES, *overrides, "rollout.n=1"])


def test_rollout_n_1_is_accepted_where_the_baseline_is_not_the_group():
    cfg = compose_config([*TINY_OVERRIDES, "trainer.adv_estimator=reinforce_plus_plus_baseline", "rollout.n=1"])
    assert cfg.rollout.n == 1  # REINFORCE++: the whole batch is whitened; gae: the critic is the baseline


def test_rollout_n_1_with_dler_exits_2_on_the_cli(tmp_path):
    proc = train_cli(tmp_path / "run", "+recipe=dler", "rollout.n=1", timeout=120)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "rollout.n=1" in line and "trainer.filter_groups" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ no learning (issue 19 point 4)
NO_SIGNAL = ["reward.terms.correctness.weight=0", "trainer.no_learning.steps=2", "trainer.steps=3"]


def test_no_learning_stops_the_run_with_the_likely_cause(tmp_path):
    """Every reward equal: today the run trains on zero gradients to the end, silently (the
    lr_scheduler warning was its only output)."""
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, *NO_SIGNAL, "trainer.save_every=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "no learning for 2 steps in a row (steps 1-2: every advantage was zero)" in line
    # the tiny model answers nothing right in its first steps (seed 0): that is the likely cause named
    assert "likely cause: every response was graded incorrect (0% accuracy)" in line
    assert "trainer.no_learning.action=warn" in line
    assert "lr_scheduler" not in proc.stderr + proc.stdout
    assert checkpoint_steps(run_dir) == ["step_000001"]  # step 2 stopped before its save
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_updates"] for r in rows if "train/skipped_updates" in r] == [1.0]


def test_no_learning_warn_mode_says_it_once_and_trains_on(make_trainer):
    trainer = make_trainer(*NO_SIGNAL, "trainer.no_learning.action=warn", *FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    said = [str(w.message) for w in caught if "no learning" in str(w.message)]
    assert len(said) == 1 and "steps 1-2" in said[0]
    assert trainer.global_step == 3
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


def _group(texts: list[str], correct: list[bool], rewards: list[float]) -> SimpleNamespace:
    return SimpleNamespace(texts=texts, correct=correct, rewards=rewards)


@pytest.mark.parametrize("overrides, groups, kept, cause", [
    ([], [_group(["a", "b"], [False, False], [0.0, 0.0])], False, "0% accuracy.*grader mismatch"),
    ([], [_group(["a", "b"], [True, True], [1.0, 1.0])], False, "100% accuracy.*harder data"),
    (["reward.require_think_close=true"], [_group(["a", "b"], [False, False], [0.0, 0.0])], False,
     "no response closed </think>.*reward.require_think_close=false"),
    ([], [_group(["a", "b"], [True, True], [1.0, 1.0]), _group(["c", "d"], [False, False], [0.0, 0.0])], True,
     "same reward or correctness \\(accuracy 50%"),
])
def test_no_learning_names_the_likely_cause(overrides, groups, kept, cause):
    cfg = compose_config([*TINY_OVERRIDES, "trainer.no_learning.steps=1", *overrides])
    guard = NoLearningGuard(cfg)
    batch = SimpleNamespace(advantages=torch.zeros(4), token_advantages=None)
    with pytest.raises(TrainingError, match=cause):
        guard.observe(1, groups, groups if kept else [], batch if kept else None, {})


def test_an_update_resets_the_no_learning_streak():
    cfg = compose_config([*TINY_OVERRIDES, "trainer.no_learning.steps=2"])
    guard = NoLearningGuard(cfg)
    group = [_group(["a", "b"], [True, False], [1.0, 0.0])]
    metrics: dict[str, float] = {}
    guard.observe(1, group, [], None, metrics)
    assert metrics["train/skipped_updates"] == 1.0
    guard.observe(2, group, group, SimpleNamespace(advantages=torch.tensor([1.0, -1.0]), token_advantages=None),
                  metrics)
    assert metrics["train/skipped_updates"] == 0.0
    guard.observe(3, group, [], None, metrics)  # a streak of 1 again: no stop
    assert guard.streak == 1
