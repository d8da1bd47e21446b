"""The GRPO trainer on the tiny embedded model: one real step, invariants of the update."""

import copy

import torch

from rlspec.trainers.batch import micro_batches


def test_one_step_updates_the_policy_and_reports_metrics(make_trainer):
    trainer = make_trainer("+recipe=grpo")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step()
    for key in ("reward/mean", "acc/mean", "response_length/mean", "response_length/p50", "response_length/p90",
                "response_length/max", "response_length/clip_ratio", "actor/entropy", "actor/pg_clipfrac",
                "actor/ppo_kl", "actor/grad_norm", "perf/tokens_per_s", "timing_s/rollout", "timing_s/reward",
                "timing_s/train"):
        assert key in metrics, key
    assert metrics["batch/groups_generated"] == 4
    assert metrics["actor/num_updates"] == 1
    if metrics["adv/abs_mean"] > 0:
        changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, "an optimizer step with non-zero advantages must change the weights"


def test_rollout_logprobs_equal_recomputed_logprobs(make_trainer):
    trainer = make_trainer()
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    engine_logprobs = [lp.clone() for lp in batch.old_logprobs]
    trainer.actor.recompute_old_logprobs(batch)
    diff = max(float((a - b).abs().max()) for a, b in zip(engine_logprobs, batch.old_logprobs) if len(a))
    assert diff < 1e-3, diff


def test_gradient_accumulation_equals_one_big_batch(make_trainer):
    trainer = make_trainer("trainer.adv_estimator=dr_grpo")
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    batch.advantages = torch.linspace(-1, 1, batch.size)  # non-degenerate advantages
    start_model = copy.deepcopy(trainer.model.state_dict())
    start_opt = copy.deepcopy(trainer.strategy.optimizer.state_dict())
    results = []
    # one big micro-batch, fixed-size micro-batches, and a padded-token budget (dynamic bsz)
    for micro, budget in ((16, None), (3, None), (16, 160)):
        trainer.model.load_state_dict(start_model)
        trainer.strategy.optimizer.load_state_dict(start_opt)
        trainer.tc.micro_batch_size = micro
        trainer.tc.micro_batch_tokens = budget
        trainer.update_policy(batch, step=1)
        results.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(results[0][key], other[key], atol=2e-6, rtol=1e-4)


def test_token_budget_micro_batches(make_trainer):
    trainer = make_trainer()
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    members = list(range(batch.size))
    trainer.tc.micro_batch_size, trainer.tc.micro_batch_tokens = 1000, 160
    micros = micro_batches(batch, members, trainer.tc.micro_batch_size, trainer.tc.micro_batch_tokens)
    assert sorted(i for m in micros for i in m) == members  # every response exactly once
    for m in micros:
        padded = len(m) * (max(len(batch.prompt_ids[i]) for i in m) + max(len(batch.response_ids[i]) for i in m))
        assert padded <= 160 or len(m) == 1, (len(m), padded)
    trainer.tc.micro_batch_tokens = None
    assert len(micro_batches(batch, members, trainer.tc.micro_batch_size, trainer.tc.micro_batch_tokens)) == 1


def test_dynamic_sampling_keeps_only_informative_groups(make_trainer):
    trainer = make_trainer("+recipe=dler", "rollout.max_response_length=96", "trainer.filter_groups.max_num_gen_batches=3")
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, generated, chunks = trainer.collect_rollouts(1, timing)
    assert 1 <= chunks <= 3
    assert len(generated) == 4 * chunks
    assert len(kept) <= 4
    for group in kept:  # DLER filters on the sequence reward (filter_groups.metric=reward)
        assert max(group.rewards) != min(group.rewards)
    uninformative = [g for g in generated if len(set(g.rewards)) == 1]
    if len(kept) < 4:  # the cap was hit: every chunk was generated
        assert chunks == 3
    assert len(kept) == min(4, len(generated) - len(uninformative))


def test_kl_is_zero_before_the_first_update(make_trainer):
    trainer = make_trainer("trainer.kl_coef=0.1", "trainer.adv_estimator=dr_grpo")
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    metrics = trainer.update_policy(batch, step=1)
    assert abs(metrics["actor/kl"]) < 1e-5
