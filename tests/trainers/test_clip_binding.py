"""PPO clipping binds only when a rollout batch feeds several optimizer updates (issue 18).

With one update per rollout batch the policy that is trained *is* the policy that sampled, so the
ratio pi / pi_old is 1 on every token and clip-higher (0.2 / 0.28) never acts. With several
mini-batches (``trainer.mini_batch_size`` < ``prompts_per_step``) the later mini-batches see a
policy the earlier updates have moved: some ratios leave [0.8, 1.28], those tokens are clipped, and
a clipped token's loss is flat in its log-prob (zero gradient).

The update loop under test is the real :meth:`rlspec.trainers.actor.Actor.update` on the tiny
embedded model; a spy around ``ppo_clip_policy_loss`` records each call with the optimizer steps
taken before it, so every micro-batch is attributed to its mini-batch.
"""

import pytest
import torch

from rlspec.trainers import actor as actor_module
from rlspec.trainers.losses import ppo_clip_policy_loss

CLIP = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}


@pytest.fixture()
def make_trainer(make_trainer):
    def _make(*overrides):
        return make_trainer("trainer.clip_ratio_low=0.2", "trainer.clip_ratio_high=0.28", "trainer.lr=1e-3", *overrides)

    return _make


def _batch(trainer):
    """One step's rollouts (4 prompts x 4 responses), the trainer's own old log-probs (so the first
    forward reproduces them) and advantages of both signs on every group."""
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, _, _ = trainer.collect_rollouts(1, timing)
    batch = trainer.build_batch(kept)
    trainer.actor.recompute_old_logprobs(batch)
    batch.advantages = torch.tensor([(-1.0) ** i * (1 + i % 3) / 3 for i in range(batch.size)])
    return batch


def _update_recording_mini_batches(trainer, batch, monkeypatch):
    """Run ``Actor.update``; return its metrics and, per mini-batch (optimizer step), the
    ``(logprobs, old_logprobs, advantages, mask)`` of each of its micro-batches."""
    strategy, actor = trainer.strategy, trainer.actor
    steps_taken = [0]
    per_mini: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    last_tensors: list[dict[str, torch.Tensor]] = []

    real_step, real_tensors = strategy.step, actor.tensors

    def step(*args, **kwargs):
        steps_taken[0] += 1
        return real_step(*args, **kwargs)

    def tensors(*args, **kwargs):
        t = real_tensors(*args, **kwargs)
        last_tensors.append(t)
        return t

    def spy(logprobs, old_logprobs, advantages, **kwargs):
        assert kwargs["clip_ratio_low"] == 0.2 and kwargs["clip_ratio_high"] == 0.28
        mask = last_tensors[-1]["mask"]  # Actor.update builds a micro-batch's tensors right before its loss
        per_mini.setdefault(steps_taken[0], []).append(
            (logprobs.detach().clone(), old_logprobs.detach().clone(), advantages.detach().clone(), mask.clone()))
        return ppo_clip_policy_loss(logprobs, old_logprobs, advantages, **kwargs)

    monkeypatch.setattr(strategy, "step", step)
    monkeypatch.setattr(actor, "tensors", tensors)
    monkeypatch.setattr(actor_module, "ppo_clip_policy_loss", spy)
    metrics = trainer.update_policy(batch, step=1)
    assert sorted(per_mini) == list(range(steps_taken[0])), "every optimizer step follows its own forwards"
    return metrics, [per_mini[k] for k in sorted(per_mini)]


def _clip_stats(micros) -> tuple[float, float, float]:
    """(clipped fraction, min ratio, max ratio) over the real tokens of one mini-batch."""
    clipped = tokens = 0.0
    lo, hi = float("inf"), 0.0
    for logprobs, old, adv, mask in micros:
        pg = ppo_clip_policy_loss(logprobs, old, adv, **CLIP)
        real = mask > 0
        clipped += float(((pg.clipped_high | pg.clipped_low) & real).sum())
        tokens += float(real.sum())
        lo, hi = min(lo, float(pg.ratio[real].min())), max(hi, float(pg.ratio[real].max()))
    return clipped / tokens, lo, hi


def test_later_mini_batches_clip_and_clipped_tokens_get_no_gradient(make_trainer, monkeypatch):
    # 4 prompts per step -> 4 updates per step; lr 1e-3 moves the tiny model enough that the later
    # mini-batches clip 7-13% of their tokens (ratios 0.001-7); at the recipes' 5e-5 only the 4th clips
    trainer = make_trainer("trainer.mini_batch_size=1")
    metrics, minis = _update_recording_mini_batches(trainer, _batch(trainer), monkeypatch)
    assert metrics["actor/num_updates"] == 4 and len(minis) == 4
    stats = [_clip_stats(m) for m in minis]
    # the first mini-batch runs on the sampling policy: ratio 1, nothing clipped
    frac0, lo0, hi0 = stats[0]
    assert frac0 == 0.0 and 1 - 1e-4 < lo0 <= hi0 < 1 + 1e-4, stats[0]
    # the later ones run on a policy the earlier updates moved: the clip binds
    later = [frac for frac, _, _ in stats[1:]]
    assert all(frac > 0 for frac in later), stats
    assert max(hi for _, _, hi in stats[1:]) > 1.28 or min(lo for _, lo, _ in stats[1:]) < 0.8, stats
    assert metrics["actor/pg_clipfrac"] > 0
    assert metrics["actor/ratio_max"] > 1.0 + 1e-3
    assert metrics.get("actor/clipfrac_high", metrics["actor/pg_clipfrac_high"]) == metrics["actor/pg_clipfrac_high"]

    # a clipped token's loss has zero gradient w.r.t. its log-prob; an unclipped one's does not
    n_clipped = n_free = 0
    for micros in minis[1:]:
        for logprobs, old, adv, mask in micros:
            lp = logprobs.clone().requires_grad_(True)
            pg = ppo_clip_policy_loss(lp, old, adv, **CLIP)
            (grad,) = torch.autograd.grad(pg.loss_mat.sum(), lp)
            real = mask > 0
            clipped = (pg.clipped_high | pg.clipped_low) & real
            free = ~(pg.clipped_high | pg.clipped_low) & real & (adv.unsqueeze(-1) != 0)
            assert torch.all(grad[clipped] == 0), grad[clipped]
            assert torch.all(grad[free] != 0)
            n_clipped += int(clipped.sum())
            n_free += int(free.sum())
    assert n_clipped > 0 and n_free > 0


def test_one_mini_batch_never_clips(make_trainer, monkeypatch):
    """mini_batch_size null = prompts_per_step: one update on the sampling policy, every ratio 1
    (exactly 1.0 here; the tolerance allows for a padding-dependent rounding between the forward that
    recomputed the old log-probs and the training forward)."""
    trainer = make_trainer("trainer.mini_batch_size=null")
    metrics, minis = _update_recording_mini_batches(trainer, _batch(trainer), monkeypatch)
    assert metrics["actor/num_updates"] == 1 and len(minis) == 1
    frac, lo, hi = _clip_stats(minis[0])
    assert frac == 0.0 and 1 - 1e-4 < lo <= hi < 1 + 1e-4, (frac, lo, hi)
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_clip_and_dual_clip_zero_the_gradient_of_exactly_the_clipped_tokens():
    """ppo_clip_policy_loss on ratios spanning [0.05, 20] with both advantage signs: the gradient
    w.r.t. the log-prob is zero exactly where the clip (0.2 / 0.28) or the dual clip (c = 10) is
    active, and -A * ratio elsewhere."""
    ratios = torch.tensor([0.05, 0.5, 0.79, 0.81, 1.0, 1.2, 1.27, 1.29, 2.0, 9.0, 11.0, 20.0])
    old = torch.full((2, ratios.numel()), -2.0)
    lp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    pg = ppo_clip_policy_loss(lp, old, adv, clip_ratio_c=10.0, **CLIP)
    (grad,) = torch.autograd.grad(pg.loss_mat.sum(), lp)
    # A > 0: clipped above 1.28 (no lower clip: min(r A, clip(r) A) = r A for r < 1)
    assert pg.clipped_high[0].tolist() == [r > 1.28 for r in ratios.tolist()]
    assert not pg.clipped_low[0].any() and not pg.dual_clipped[0].any()
    # A < 0: clipped below 0.8, and above c = 10 by the dual clip
    assert pg.clipped_low[1].tolist() == [r < 0.8 for r in ratios.tolist()]
    assert pg.dual_clipped[1].tolist() == [r > 10 for r in ratios.tolist()]
    flat = pg.clipped_high | pg.clipped_low | pg.dual_clipped
    assert torch.all(grad[flat] == 0)
    torch.testing.assert_close(grad[~flat], (-adv.unsqueeze(-1) * pg.ratio)[~flat])
