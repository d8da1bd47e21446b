"""PPO with a critic end to end on the tiny model: GAE advantages, critic updates, warm-up,
KL in the reward, checkpoints and resume."""

import copy

import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config
from rlspec.errors import ConfigError, TrainingError
from rlspec.trainers.batch import flatten_groups

FAST = ["eval.at_start=false", "eval.at_end=false", "trainer.prompts_per_step=4", "rollout.n=2",
        "rollout.max_response_length=48"]


@pytest.fixture()
def make_trainer(make_trainer):
    def _make(*overrides, run_dir=None):
        return make_trainer(*FAST, *overrides, run_dir=run_dir)

    return _make


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_gae_batch_has_per_token_advantages_and_the_critic_learns(make_trainer):
    trainer = make_trainer("+recipe=ppo", "trainer.mini_batch_size=2")
    kept, _, _ = trainer.collect_rollouts(1, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    metrics = {}
    batch = trainer.build_batch(kept, metrics)
    assert batch.token_advantages is not None and batch.returns is not None
    assert [a.numel() for a in batch.token_advantages] == [len(r) for r in batch.response_ids]
    # lambda = gamma = 1 and no KL: every token's return is the response's outcome reward
    for ret, reward in zip(batch.returns, batch.rewards):
        assert torch.allclose(ret, torch.full_like(ret, float(reward)), atol=1e-5)
    assert {"critic/values_mean", "critic/returns_mean", "critic/explained_var"} <= set(metrics)
    losses = [trainer.critic.update(batch, step)["critic/vf_loss"] for step in range(1, 6)]
    assert losses[-1] < losses[0], losses  # the value loss falls on a fixed batch
    assert trainer.critic.update(batch, 6)["critic/num_updates"] == 2.0  # 4 prompts / mini-batches of 2


def test_critic_warmup_freezes_the_policy_and_then_trains_it(make_trainer):
    trainer = make_trainer("+recipe=ppo", "critic.warmup_steps=1", "trainer.steps=2")
    policy0, critic0 = _weights(trainer.model), _weights(trainer.critic.value_model)
    m1 = trainer.train_step()
    assert m1["actor/num_updates"] == 0.0 and m1["critic/num_updates"] >= 1.0
    assert _same(policy0, _weights(trainer.model))
    assert not _same(critic0, _weights(trainer.critic.value_model))
    m2 = trainer.train_step()
    assert m2["actor/num_updates"] >= 1.0 and not _same(policy0, _weights(trainer.model))


def test_vapo_recipe_uses_decoupled_and_length_adaptive_lambdas(make_trainer):
    trainer = make_trainer("+recipe=vapo", "critic.warmup_steps=0", "trainer.mini_batch_size=2")
    metrics = trainer.train_step()
    lam = metrics["critic/actor_lam_mean"]
    assert 0.0 <= lam < 1.0  # 1 - 1/(0.05 l) for the tiny model's short responses
    assert metrics["actor/num_updates"] == 2.0


def test_checkpoint_keeps_the_critic_and_resume_restores_it(make_trainer, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer("+recipe=ppo", "trainer.steps=2", "trainer.save_every=1", run_dir=run)
    trainer.train_step()
    trainer.save()
    saved = _weights(trainer.critic.value_model)
    saved_opt = copy.deepcopy(trainer.critic.strategy.optimizer_state()["state"])  # live tensors otherwise
    trainer.train_step()  # moves the critic past the checkpoint
    assert not _same(saved, _weights(trainer.critic.value_model))
    resumed = make_trainer("+recipe=ppo", "trainer.steps=2", "trainer.save_every=1", run_dir=run)
    path = resumed.maybe_resume()
    assert path is not None and path.name.endswith("1") and (path / "critic" / "value_model.safetensors").is_file()
    assert _same(saved, _weights(resumed.critic.value_model))
    restored_opt = resumed.critic.strategy.optimizer_state()["state"]
    assert all(torch.equal(saved_opt[k]["exp_avg"], restored_opt[k]["exp_avg"]) for k in saved_opt)
    # a critic dir is also a valid critic.path (backbone and head)
    again = make_trainer("+recipe=ppo", f"critic.path={path / 'critic'}", run_dir=tmp_path / "other")
    assert _same(saved, _weights(again.critic.value_model))


def test_resuming_a_grpo_checkpoint_as_ppo_names_the_problem(make_trainer, tmp_path):
    run = tmp_path / "run"
    grpo = make_trainer("trainer.steps=1", run_dir=run)
    grpo.train_step()
    grpo.save()
    ppo = make_trainer("+recipe=ppo", "trainer.steps=1", run_dir=run)
    with pytest.raises(TrainingError, match="adv_estimator=gae"):
        ppo.maybe_resume()


def test_kl_in_reward_lowers_each_reward_by_its_summed_kl(make_trainer):
    trainer = make_trainer("trainer.kl_in_reward=true", "trainer.kl_reward_coef=0.5", "trainer.lr=1e-2")
    trainer.train_step()  # the policy moves away from the reference
    kept, _, _ = trainer.collect_rollouts(2, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    raw = flatten_groups(kept, trainer.cfg.rollout.n).rewards
    kl = trainer.actor.kl_to_reference(flatten_groups(kept, trainer.cfg.rollout.n))
    assert sum(float(k.sum()) for k in kl) > 0  # k3 >= 0, and > 0 once the policy moved
    metrics = {}
    batch = trainer.build_batch(kept, metrics)
    assert torch.allclose(batch.rewards, raw - 0.5 * torch.stack([k.sum() for k in kl]), atol=1e-5)
    assert metrics["reward/kl_penalty"] > 0


def test_gae_without_the_run_wiring_is_refused(tiny_model_path, tmp_path):
    from rlspec.models import load_causal_lm, load_tokenizer
    from rlspec.trainers.grpo import GRPOTrainer

    cfg = compose_config([*TINY_OVERRIDES, f"run_dir={tmp_path}", "+recipe=ppo"])
    with pytest.raises(ConfigError, match="recipe=ppo"):
        GRPOTrainer(cfg, model=load_causal_lm(str(tiny_model_path)), tokenizer=load_tokenizer(str(tiny_model_path)),
                    engine=None, eos_ids=[0], train_rows=[], eval_rows=[], train_prompt_ids=[], eval_prompt_ids=[],
                    run_dir=tmp_path, reward_terms={})
