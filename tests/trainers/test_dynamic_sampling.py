"""DAPO dynamic sampling (arXiv 2503.14476 Sec. 3.2; verl ``algorithm.filter_groups``): what a step
does when ``max_num_gen_batches`` chunks leave it short of ``prompts_per_step`` groups, and which
metric DLER (arXiv 2510.15110 Sec. 3.3) filters on. Rollouts are replaced by made-up groups, so
each case is exact."""

import warnings

import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config
from rlspec.errors import ConfigError, TrainingError
from rlspec.trainers.batch import Group


def group(row: int, correct: list[bool], rewards: list[float] | None = None, finish: list[str] | None = None) -> Group:
    n = len(correct)
    return Group(row_index=row, prompt_ids=[1, 2], response_ids=[[3, 4]] * n,
                 old_logprobs=[torch.zeros(2)] * n, finish_reasons=finish or ["stop"] * n, texts=["..."] * n,
                 rewards=rewards if rewards is not None else [float(c) for c in correct], correct=list(correct))


def serve(trainer, monkeypatch, make_group):
    """Generation chunks return ``make_group(i)`` for the ``i``-th prompt served (0, 1, ...)."""
    calls = []

    def generate_groups(row_indices, seed, timing):
        first = sum(len(c) for c in calls)
        calls.append(list(row_indices))
        return [make_group(first + j, r) for j, r in enumerate(row_indices)]

    monkeypatch.setattr(trainer, "generate_groups", generate_groups)
    return calls


def test_a_short_batch_warns_once_and_logs_the_groups_missing(make_trainer, monkeypatch):
    trainer = make_trainer("+recipe=dapo", "trainer.filter_groups.max_num_gen_batches=3")
    # only the first prompt ever served gets a mixed group: step 1 keeps 1 of 4, step 2 none
    calls = serve(trainer, monkeypatch, lambda i, r: group(r, [True, True, False, False] if i == 0 else [True] * 4))
    with pytest.warns(UserWarning, match=r"trainer\.filter_groups\.max_num_gen_batches=3.*trainer\.gen_batch_size"):
        metrics = trainer.train_step()
    assert len(calls) == 3  # every chunk was generated
    assert metrics["batch/groups_kept"] == 1 and metrics["train/groups_short"] == 3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = trainer.train_step()
    assert again["train/groups_short"] == 4 and len(calls) == 6
    assert not [w for w in seen if "max_num_gen_batches" in str(w.message)]  # said once: now only logged


def test_a_full_batch_logs_no_groups_missing(make_trainer, monkeypatch):
    trainer = make_trainer("+recipe=dapo")
    serve(trainer, monkeypatch, lambda i, r: group(r, [True, False, False, False]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kept, generated, chunks = trainer.collect_rollouts(1, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    assert len(kept) == 4 and chunks == 1 and trainer._engine_stats["train/groups_short"] == 0.0
    assert not [w for w in seen if "max_num_gen_batches" in str(w.message)]


def test_on_short_error_stops_like_verl_and_names_the_keys(make_trainer, monkeypatch):
    trainer = make_trainer("+recipe=dapo", "trainer.filter_groups.max_num_gen_batches=2",
                           "trainer.filter_groups.on_short=error")
    serve(trainer, monkeypatch, lambda i, r: group(r, [False] * 4))
    with pytest.raises(TrainingError, match=r"0 of 4 groups.*trainer\.filter_groups\.max_num_gen_batches=2.*"
                                            r"trainer\.gen_batch_size.*trainer\.filter_groups\.on_short=train"):
        trainer.collect_rollouts(1, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    with pytest.raises(ConfigError, match="trainer.filter_groups.on_short"):
        compose_config([*TINY_OVERRIDES, "trainer.filter_groups.on_short=retry"])


def test_dler_filters_on_the_sequence_reward(make_trainer, monkeypatch):
    """DLER keeps a group whose rewards differ: all correct but one cut at the target length (reward
    0, Sec. 2) is a signal (shorter wins); a correct answer cut before EOS among wrong ones leaves
    every reward 0 -- no signal, though its accuracy differs."""
    assert compose_config(["+recipe=dler"]).trainer.filter_groups.metric == "reward"
    assert compose_config(["+recipe=dapo"]).trainer.filter_groups.metric == "acc"
    cut_one = dict(correct=[True] * 4, rewards=[1.0, 1.0, 1.0, 0.0], finish=["stop"] * 3 + ["length"])
    cut_right = dict(correct=[True, False, False, False], rewards=[0.0] * 4, finish=["length"] + ["stop"] * 3)
    trainer = make_trainer("+recipe=dler", "trainer.filter_groups.max_num_gen_batches=1")
    serve(trainer, monkeypatch, lambda i, r: group(r, **(cut_one if i % 2 == 0 else cut_right)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batch is short here
        kept, generated, _ = trainer.collect_rollouts(1, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    assert [g.rewards for g in kept] == [cut_one["rewards"]] * 2 and len(generated) == 4
