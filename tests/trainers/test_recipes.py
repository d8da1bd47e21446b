"""Every recipe runs end to end for a couple of steps; schedule, truncation and tag hooks."""

import json

import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config
from rlspec.rewards import RewardBatch, compute_rewards
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutResult, SamplingParams
from rlspec.session import build_trainer, group_options
from rlspec.trainers.hooks import RolloutChunk
from rlspec.trainers.schedules import length_at

# tiny-model sizes for the recipes whose lengths are set for the embedded default
TINY_RECIPE_OVERRIDES = {
    "siri": ["rollout.length_schedule.kwargs={l_max: 96, l_min: 48, period: 2}"],
    "thinkprune": ["rollout.length_schedule.kwargs={lengths: [96, 64, 48], boundaries: [1, 2]}"],
    "dler_da": ["rollout.truncation.kwargs={tiers: [[0.5, 48]]}"],
    # mini-batches of 8 prompts (2 updates per step at 16 prompts) -> 2 updates per step at 4 prompts
    "anytime": ["trainer.mini_batch_size=2"],
    "l1_exact": ["trainer.mini_batch_size=2"],
    "l1_max": ["trainer.mini_batch_size=2"],
}


def _chunk(trainer, batch: RewardBatch, result: RolloutResult | None = None) -> RolloutChunk:
    """A generation chunk holding ``batch`` (and ``result``), as the trainer hands it to its hooks."""
    return RolloutChunk(step=0, seed=0, max_length=trainer.max_length_at(0), engine=trainer.engine, row_indices=[],
                        rows=[], prompt_ids=[], params=SamplingParams(), timing={}, result=result,
                        texts=list(batch.completions), batch=batch)


def _score(trainer, batch: RewardBatch):
    batch.correct = []
    return compute_rewards(batch, trainer.reward_terms, require_think_close=trainer.cfg.reward.require_think_close)


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_runs_two_steps(make_trainer, recipe):
    trainer = make_trainer(f"+recipe={recipe}", "eval.at_start=false", "eval.at_end=false",
                           *TINY_RECIPE_OVERRIDES.get(recipe, []))
    for step in (1, 2):
        metrics = trainer.train_step()
        assert trainer.global_step == step
        assert metrics["response_length/max"] <= metrics["rollout/max_length"]
        assert all(v == v for k, v in metrics.items() if k.startswith(("reward/", "actor/pg_loss"))), metrics
    assert trainer.save().is_dir()


def test_length_schedule_sets_each_steps_cap_and_is_logged(make_trainer):
    kwargs = {"l_max": 96, "l_min": 32, "period": 4}
    trainer = make_trainer("+recipe=siri", "trainer.steps=3", "eval.at_start=false", "eval.at_end=false",
                           "rollout.length_schedule.kwargs={l_max: 96, l_min: 32, period: 4}")
    caps = []
    for _ in range(3):
        metrics = trainer.train_step()
        caps.append(metrics["rollout/max_length"])
        assert metrics["response_length/max"] <= metrics["rollout/max_length"]
    assert caps == [length_at("siri_cosine", t, kwargs) for t in range(3)] == [96, 64, 32]


def test_bad_schedule_fails_at_start(make_trainer):
    from rlspec.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.length_schedule"):
        make_trainer("+recipe=siri", "rollout.length_schedule.kwargs={l_max: 96, l_min: 128, period: 4}")


def test_siri_phase_checkpoints_are_tagged_and_kept(make_trainer):
    trainer = make_trainer("+recipe=siri", "trainer.steps=4", "trainer.save_every=0", "trainer.save_total_limit=1",
                           "eval.at_start=false", "eval.at_end=false",
                           "rollout.length_schedule.kwargs={l_max: 96, l_min: 48, period: 2}")
    trainer.fit()
    root = trainer.run_dir / "checkpoints"
    tags = json.loads((root / "tags.json").read_text())
    assert tags == {"siri-low": ["step_000001", "step_000003"], "siri-high": ["step_000002", "step_000004"]}
    for names in tags.values():
        for name in names:  # protected from rotation despite save_total_limit=1
            assert (root / name / "model" / "config.json").is_file(), name
    assert json.loads((root / "step_000003" / "meta.json").read_text())["tags"] == ["siri-low"]


def test_difficulty_aware_truncation_cuts_easy_groups_and_rescores(make_trainer):
    trainer = make_trainer("+recipe=dler_da", "rollout.n=2", "rollout.truncation.kwargs={tiers: [[0.5, 3]]}")
    tok = trainer.tokenizer
    right = tok("</think>\nThe answer is \\boxed{7}.", add_special_tokens=False)["input_ids"] + trainer.eos_ids[:1]
    wrong = tok("</think>\nThe answer is \\boxed{8}.", add_special_tokens=False)["input_ids"] + trainer.eos_ids[:1]
    # group 0: both correct (easy: rho = 1 -> limit 3); group 1: one correct (rho = 0.5 -> easy too);
    # group 2: none correct (hard: limit 96, nothing cut)
    responses = [right, right, right, wrong, wrong, wrong]
    result = RolloutResult(prompt_ids=[[1]] * 6, response_ids=[list(r) for r in responses],
                           response_logprobs=[torch.zeros(len(r)) for r in responses],
                           finish_reasons=[FINISH_STOP] * 6)
    batch = RewardBatch(prompts=["q"] * 6, completions=[tok.decode(r) for r in responses],
                        completion_ids=result.response_ids, finish_reasons=result.finish_reasons,
                        answers=["7"] * 6, correct=[], group_ids=[0, 0, 1, 1, 2, 2])
    _, _, correct = _score(trainer, batch)
    assert correct == [True, True, True, False, False, False]
    (hook,) = trainer.hooks  # rollout.truncation.name=difficulty_aware
    chunk = _chunk(trainer, batch, result)
    hook.before_scoring(chunk)
    clipped = chunk.result
    assert [len(r) for r in clipped.response_ids] == [3, 3, 3, 3, len(wrong), len(wrong)]
    assert clipped.finish_reasons == [FINISH_LENGTH] * 4 + [FINISH_STOP] * 2
    assert [len(lp) for lp in clipped.response_logprobs] == [3, 3, 3, 3, len(wrong), len(wrong)]
    rewards, _, correct_after = _score(trainer, chunk.batch)
    assert correct_after == [False] * 6  # the clipped text has no answer
    assert rewards == [0.0] * 6


def test_hapo_history_is_checkpointed_and_restored(make_trainer):
    trainer = make_trainer("+recipe=hapo", "trainer.steps=2", "eval.at_start=false", "eval.at_end=false")
    trainer.train_step()
    history = trainer.reward_state.get("hapo")
    assert history is not None and "min_correct_length" in history
    trainer.save()
    resumed = make_trainer("+recipe=hapo", "trainer.steps=2", "eval.at_start=false", "eval.at_end=false")
    assert resumed.maybe_resume() is not None
    assert resumed.reward_state == trainer.reward_state
    # the reward batches of the resumed run see the restored history (same dict object)
    resumed.train_step()
    assert resumed.reward_state["hapo"]["min_correct_length"].keys() >= history["min_correct_length"].keys()


def test_restart_without_a_checkpoint_drops_the_crashed_runs_rows(make_trainer, tmp_path):
    """A run killed before its first checkpoint restarts at step 0: the rows it left in
    metrics.jsonl would be logged twice (seen after a killed `rlspec.compare`)."""
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "reward/mean": 0.5}}\n' for i in range(4)))
    (tmp_path / "completions.jsonl").write_text('{"step": 1, "text": "x"}\n')
    trainer = make_trainer("trainer.steps=1", "eval.at_start=false", "eval.at_end=false")
    assert trainer.maybe_resume() is None
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "completions.jsonl").read_text() == ""
    trainer.train_step()
    trainer.save()  # step 1
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n')
    resumed = make_trainer("trainer.steps=1", "eval.at_start=false", "eval.at_end=false")
    assert resumed.maybe_resume() is not None  # with a checkpoint the rows up to it stay
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "reward/mean": 0.5}\n'


def test_hapo_term_uses_and_updates_the_history():
    state: dict = {}

    def batch(lengths, correct):
        return RewardBatch(prompts=["q"] * len(lengths), completions=["x"] * len(lengths),
                           completion_ids=[[1] * n for n in lengths], finish_reasons=["stop"] * len(lengths),
                           answers=["1"] * len(lengths), correct=list(correct), group_ids=[0] * len(lengths),
                           columns={"uid": ["p1"] * len(lengths)}, state=state)

    terms = {"hapo": {"weight": 1.0, "kwargs": {}}}
    _, raw, _ = compute_rewards(batch([10, 20], [True, False]), terms)
    assert raw["hapo"] == [0.0, 0.0]  # no history yet
    assert state["hapo"]["min_correct_length"] == {"p1": 10}
    _, raw, _ = compute_rewards(batch([10, 5, 30], [True, True, False]), terms)
    # h = 10: L=10 -> cos(pi/2) = 0; L=5 -> cos(pi/4); wrong L=30 >= 2h -> min(0, -1) = -1
    assert raw["hapo"] == pytest.approx([0.0, 0.7071067811865476, -1.0])
    assert state["hapo"]["min_correct_length"] == {"p1": 5}


def test_hbpo_rollouts_carry_budgets_into_reward_and_advantage(make_trainer):
    trainer = make_trainer("+recipe=hbpo", "rollout.budget.kwargs={budgets: [16, 64]}", "hbpo.l_max=96")
    timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
    kept, generated, _ = trainer.collect_rollouts(1, timing)
    group = generated[0]
    assert group.budgets == [16, 16, 64, 64]
    prefill = trainer.tokenizer.decode(group.response_prompt_ids[2][len(group.prompt_ids):])
    assert prefill == " I will answer the question within 64 tokens.\n"
    assert trainer.reward_terms["hbpo"]["kwargs"] == {"variant": "paper", "l_max": 96, "beta": 4.0, "alpha": None}
    batch = trainer.build_batch(generated)
    assert batch.budgets.tolist() == [float(b) for g in generated for b in g.budgets]
    assert batch.prompt_ids[2] == group.response_prompt_ids[2]
    assert torch.isfinite(batch.advantages).all()


def test_hbpo_logs_per_budget_lengths(make_trainer):
    trainer = make_trainer("+recipe=hbpo", "rollout.budget.kwargs={budgets: [16, 64]}", "hbpo.l_max=96")
    metrics = trainer.train_step()
    for b in (16, 64):
        assert metrics[f"budget/{b}/response_length_mean"] > 0
        assert 0.0 <= metrics[f"budget/{b}/acc"] <= 1.0


def test_palu_budgets_shrink_only_after_a_high_pass_rate(make_trainer):
    trainer = make_trainer("+recipe=palu", "rollout.n=4")
    (hook,) = trainer.hooks  # rollout.truncation.name=palu
    hook.records = {
        "easy": {"budget": 96, "pass_rate": 1.0, "correct_lengths": [10, 20, 30, 40]},
        "hard": {"budget": 50, "pass_rate": 0.5, "correct_lengths": [10]},
    }
    batch = RewardBatch(prompts=["q"] * 6, completions=["x"] * 6, completion_ids=[[1]] * 6,
                        finish_reasons=["stop"] * 6, answers=["1"] * 6, correct=[], group_ids=[0, 0, 1, 1, 2, 2],
                        columns={"uid": ["easy", "easy", "hard", "hard", "new", "new"]})
    # easy: 96 - floor(Q1.0 - Q0.5) = 96 - floor(40 - 25) = 81; hard: pass rate < 0.8 -> L_max 96; new: 96
    chunk = _chunk(trainer, batch)
    assert hook.limits(chunk) == [81, 81, 96, 96, 96, 96]
    batch.columns["truncation_limit"] = [81, 81, 96, 96, 96, 96]
    batch.completion_ids = [[1] * 5, [1] * 7, [1] * 3, [1] * 4, [1], [1]]
    chunk.correct = [True, False, False, False, True, True]
    hook.after_scoring(chunk)
    assert hook.records["easy"] == {"budget": 81, "pass_rate": 0.5, "correct_lengths": [5]}
    assert hook.records["new"]["pass_rate"] == 1.0
    # the budgets are run state: in the checkpoint, and back on resume
    assert trainer.state_dict()["hooks"]["palu"]["records"] == hook.records


@pytest.mark.parametrize("overrides, key", [
    (["+recipe=dler_da", "rollout.truncation.kwargs={tiers: [[0.5, 500]]}"], "exceed the rollout cap"),
    (["+recipe=dler_da", "rollout.truncation.kwargs={tiers: [[1.5, 50]]}"], "rollout.truncation.kwargs"),
    (["+recipe=palu", "rollout.truncation.kwargs={C: 2.0, tau: 0.5}"], "rollout.truncation.kwargs"),
    (["+recipe=hbpo", "rollout.n=6", "rollout.budget.kwargs={budgets: [16, 32, 48, 64]}"], "rollout.n=6"),
    (["+recipe=grpo", "trainer.adv_estimator=hbpo"], "rollout.budget.name=hbpo"),
])
def test_bad_rollout_hook_settings_fail_at_start(make_trainer, overrides, key):
    from rlspec.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        make_trainer(*overrides)


class _ScriptedEngine:
    """Returns scripted responses per generate() call and records the prompts it was given."""

    def __init__(self, *results):
        self.results = list(results)
        self.prompts: list[list[list[int]]] = []
        self.params = []

    def generate(self, prompt_ids, params):
        self.prompts.append([list(p) for p in prompt_ids])
        self.params.append(params)
        responses = self.results.pop(0)
        assert len(responses) == len(prompt_ids)
        return RolloutResult(prompt_ids=[list(p) for p in prompt_ids], response_ids=[list(r) for r in responses],
                             response_logprobs=[torch.zeros(len(r)) for r in responses],
                             finish_reasons=[FINISH_STOP] * len(responses))

    def update_weights(self):
        pass


def test_anytime_step_hand_computed(make_trainer):
    """AnytimeReasoner on one prompt, n=2, budgets [2, 4], 2 summaries per slot, linear prior.

    r0 thinks 4 tokens without closing (cuts 2, 4); r1 closes after 3 (cuts 2, 3).
    Summary scores: r0 slot 0 [0, 0], slot 1 [1, 0]; r1 slot 0 [1, 1], slot 1 [1, 1]
    -> r = [[0, .5], [1, 1]]; p = [1/3, 2/3]; G = [[1/3, 1/3], [1, 2/3]]; V2 = [2/3, 1/2]
    V1 (s=1) = r_0 * p_1 = [0, 2/3]; V = [[2/3, (0 + .5)/2], [2/3, (2/3 + .5)/2]]
    A = [[-1/3, 1/12], [1/3, 1/12]]; summary advantages: score - pool mean -> only r0 slot 1 is +-.5.
    """
    trainer = make_trainer("+recipe=anytime", "rollout.n=2", "trainer.prompts_per_step=1",
                           "trainer.mini_batch_size=null", "anytime.budgets=[2,4]", "anytime.n_summary=2",
                           "eval.at_start=false", "eval.at_end=false")
    tok = trainer.tokenizer
    close = tok.convert_tokens_to_ids("</think>")
    think = tok("We need", add_special_tokens=False)["input_ids"][:1] * 4
    r0, r1 = think[:4], think[:2] + [close]
    trainer.sampler = type("OneRow", (), {"take": lambda self, k: [0] * k, "state_dict": lambda self: {}})()
    gold = trainer.train_rows[0]["answer"]
    say = lambda a: tok(f"The answer is \\boxed{{{a}}}.", add_special_tokens=False)["input_ids"] + trainer.eos_ids[:1]  # noqa: E731
    right, wrong = say(gold), say(f"{gold}1")
    engine = _ScriptedEngine([r0, r1], [wrong, wrong, right, wrong, right, right, right, right])
    trainer.engine = engine
    metrics = trainer.train_step()
    prompt = trainer.train_prompt_ids[0]
    (hook,) = trainer.hooks  # anytime.enable
    cut, fin = hook.cut_ids, hook.finished_ids
    assert engine.params[0].max_new_tokens == 4 and "</think>" in engine.params[0].stop_strings
    assert engine.params[1].max_new_tokens == 32 and "</think>" not in engine.params[1].stop_strings
    # summary prompts: r0 cut at 2 and 4 (cut text), r1 cut at 2 (cut text) and its own end (finished text)
    assert engine.prompts[1] == [prompt + r0[:2] + cut] * 2 + [prompt + r0 + cut] * 2 + \
        [prompt + r1[:2] + cut] * 2 + [prompt + r1 + fin] * 2
    assert metrics["anytime/score_at_2"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert metrics["anytime/score_at_4"] == pytest.approx(0.75)  # (.5 + 1) / 2
    assert metrics["acc/mean"] == pytest.approx(0.5)  # r1 correct at the full budget, r0 at 0.5 is not
    assert metrics["anytime/summaries"] == 8
    engine.results = [[r0, r1], [wrong, wrong, right, wrong, right, right, right, right]]
    kept, _, _ = trainer.collect_rollouts(2, {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0})
    batch = trainer.build_batch(kept)
    # one packed row per rollout: thinking, then each summary behind its closing text
    assert batch.size == 2 and batch.group_rows == [[0, 1]]
    assert batch.response_ids[0] == r0 + (cut + wrong) * 2 + (cut + right) + (cut + wrong)
    assert batch.response_ids[1] == r1 + (cut + right) * 2 + (fin + right) * 2
    torch.testing.assert_close(batch.token_advantages[0][:4], torch.tensor([-1 / 3, -1 / 3, 1 / 12, 1 / 12]))
    torch.testing.assert_close(batch.token_advantages[1][:3], torch.tensor([1 / 3, 1 / 3, 1 / 12]))

    def segment_values(i, think_len, closings, values):
        out, pos = [], think_len
        for c, summary in closings:
            out.append(float(values[i][pos + len(c)]))
            pos += len(c) + len(summary)
        return out

    segs0 = [(cut, wrong), (cut, wrong), (cut, right), (cut, wrong)]
    segs1 = [(cut, right), (cut, right), (fin, right), (fin, right)]
    assert segment_values(0, 4, segs0, batch.token_advantages) == pytest.approx([0, 0, 0.5, -0.5])
    assert segment_values(1, 3, segs1, batch.token_advantages) == pytest.approx([0, 0, 0, 0])
    # closing texts are not trained (inserted, not sampled)
    assert batch.loss_masks[0][4 : 4 + len(cut)].sum() == 0 and batch.loss_masks[0][:4].sum() == 4
    # the packed forward gives each summary the log-probs it has on its own prompt (tree mask + positions)
    t = trainer.actor.tensors(batch, [0, 1])
    assert t["advantages"].shape == t["mask"].shape == (2, len(batch.response_ids[0]))
    with torch.no_grad():
        packed_lp, _ = trainer.actor.response_logprobs(trainer.model, t, with_entropy=False)
        for row, (think, segs) in enumerate(((r0, segs0), (r1, segs1))):
            pos = len(think)
            for (closing, summary), c_at in zip(segs, [2, 2, 4, 4] if row == 0 else [2, 2, 3, 3]):
                own = torch.tensor([prompt + think[:c_at] + closing + summary])
                logits = trainer.model(own).logits[0, -len(summary) - 1 : -1] / trainer.cfg.rollout.temperature
                ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(summary)[:, None])[:, 0]
                got = packed_lp[row, pos + len(closing) : pos + len(closing) + len(summary)]
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
                pos += len(closing) + len(summary)


def test_anytime_thinking_rollout_goes_through_the_online_drafter(make_trainer):
    """With TLT's spot trainer on, AnytimeReasoner's thinking is a training rollout like any other
    (its long tail trains the drafter); the summaries sampled after it are not."""
    trainer = make_trainer("+recipe=anytime", "rollout.n=2", "trainer.prompts_per_step=1",
                           "trainer.mini_batch_size=null", "anytime.budgets=[2,4]", "anytime.n_summary=1",
                           "eval.at_start=false", "eval.at_end=false")
    tok = trainer.tokenizer
    think = tok("We need", add_special_tokens=False)["input_ids"][:1] * 4
    summary = tok("\\boxed{1}", add_special_tokens=False)["input_ids"] + trainer.eos_ids[:1]
    engine = _ScriptedEngine([think, think], [summary] * 4)
    trainer.engine = engine
    calls = []

    class RecordingOnlineDrafting:
        def generate(self, prompt_ids, params, step):
            calls.append((len(prompt_ids), step))
            return engine.generate(prompt_ids, params)

    trainer.online_drafting = RecordingOnlineDrafting()
    trainer.train_step()
    assert calls == [(2, 1)]  # the thinking of the step's n=2 rollouts, at step 1
    assert len(engine.prompts) == 2 and len(engine.prompts[1]) == 4  # the summaries went to the engine


def test_evaluation_long_tail_does_not_start_the_spot_trainer(make_trainer):
    """An evaluation rollout reaches the long tail too; the spot trainer must not start there (it
    would still run at the next checkpoint, which then failed: seen in a `grpo` run with SD)."""
    over = ["rollout.speculative.enable=true", "rollout.speculative.mode=always", "rollout.speculative.drafter_warmup_steps=5",
            "rollout.speculative.online.on_cpu=true",
            "rollout.speculative.threshold=64", "rollout.speculative.warmup_checks=1", "eval.at_start=false", "eval.at_end=false"]
    trainer = make_trainer("+recipe=grpo", *over)
    trainer.train_step()  # fills the spot trainer's buffer, so a long tail would have data to train on
    spot = trainer.online_drafting.spot
    assert spot.buffer.num_pairs > 0 and spot._thread is None
    calls = []
    hook = trainer.engine.on_long_tail
    trainer.engine.on_long_tail = lambda finished: (calls.append(len(finished)), hook(finished))
    trainer.evaluate(trainer.global_step)
    assert calls, "the evaluation never reached the long tail: the test would not test anything"
    assert spot._thread is None
    trainer.save()  # took the spot trainer's state: failed while it was training
    assert spot.trainer.total_steps == 0
    trainer.train_step()  # a training rollout's long tail still trains it (stopped after the rollout)
    assert spot.trainer.total_steps > 0 and spot._thread is None


def test_speculative_run_trains_the_drafter_checkpoints_and_restores_it(make_trainer):
    """rollout.speculative with the spot trainer: metrics logged, the drafter saved in each
    checkpoint and restored on resume (it is trained online, so it is run state)."""
    over = ["rollout.speculative.enable=true", "rollout.speculative.mode=always", "rollout.speculative.drafter_warmup_steps=5",
            "rollout.speculative.online.on_cpu=true",
            "rollout.speculative.threshold=64", "rollout.speculative.warmup_checks=1", "eval.at_start=false", "eval.at_end=false"]
    trainer = make_trainer("+recipe=grpo", *over)
    metrics = trainer.train_step()
    assert metrics["spec/sd_steps"] > 0 and metrics["spec/accept_length"] >= 1.0
    assert "drafter/steps" in metrics
    trainer.train_step()  # step 1 filled the spot trainer's buffer: step 2's long tail trains on it
    path = trainer.save()
    assert (path / "drafter" / "drafter_config.json").is_file()
    saved = {k: v.clone() for k, v in trainer.engine.drafter.state_dict().items()}
    resumed = make_trainer("+recipe=grpo", *over)
    with torch.no_grad():  # make the fresh drafter differ, then resume must bring the saved one back
        resumed.engine.drafter.fc.weight.add_(1.0)
    assert resumed.maybe_resume() == path
    for k, v in resumed.engine.drafter.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    # the spot trainer's own state comes back too: optimizer moments, step count, RNG, buffer
    spot, resumed_spot = trainer.online_drafting.spot, resumed.online_drafting.spot
    assert spot.trainer.total_steps > 0
    assert resumed_spot.trainer.total_steps == spot.trainer.total_steps
    assert resumed_spot.published_step == spot.published_step == 2
    assert resumed_spot.buffer.num_pairs == spot.buffer.num_pairs > 0
    assert torch.equal(resumed_spot.trainer.generator.get_state(), spot.trainer.generator.get_state())
    a, b = spot.trainer.optimizer.state_dict(), resumed_spot.trainer.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for key, moments in a["state"].items():
        torch.testing.assert_close(b["state"][key]["exp_avg_sq"], moments["exp_avg_sq"])
    torch.testing.assert_close(dict(resumed_spot.trainer.shadow.named_parameters()),
                               dict(resumed.engine.drafter.named_parameters()))


def test_speculation_starts_without_a_drafter_and_resumes_with_its_history(make_trainer):
    """On a CPU the model-free sources draft from the first step (no drafter, no warm-up command);
    the history of earlier responses is checkpointed and comes back on resume."""
    over = ["rollout.speculative.enable=true", "rollout.speculative.mode=always", "rollout.speculative.lookup.lengths=[3]",
            "rollout.speculative.lookup.min_ngram=1", "eval.at_start=false", "eval.at_end=false"]
    trainer = make_trainer("+recipe=grpo", *over)
    assert trainer.engine.drafter is None and trainer.online_drafting is None
    metrics = trainer.train_step()
    assert metrics["spec/sd_steps"] > 0 and metrics["spec/self/drafted"] > 0
    assert metrics["spec/history_prompts"] == 4 and metrics["spec/history_bytes"] > 0
    path = trainer.save()
    assert (path / "draft_history.pt").is_file()
    resumed = make_trainer("+recipe=grpo", *over)
    assert len(resumed.engine.history) == 0
    assert resumed.maybe_resume() == path
    saved, restored = trainer.engine.history.state_dict(), resumed.engine.history.state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in ("tokens", "lengths", "counts"))
    assert restored["tokens"].numel() > 0


def test_lookup_speculation_trains_on_the_plain_runs_tokens_and_resumes_to_them(make_trainer, tiny_model_path, tmp_path):
    """Seeded rollouts draw position-keyed numbers and lookup drafts are verified coupled with
    plain sampling: a run with speculation on (adaptive: plain and draft steps mixed, as timing
    decides) samples the plain run's tokens, step after step, and so does a resumed run. The
    draft arms are retried every few steps (explore_cost=1): with the default pace one unlucky
    first try (no row had a match yet) leaves a short rollout with plain steps only, as measured
    on an AMD EPYC machine."""
    over = ["rollout.speculative.lookup.min_ngram=1", "rollout.speculative.lookup.min_samples=1",
            "rollout.speculative.lookup.explore_every=2", "rollout.speculative.lookup.explore_cost=1.0",
            "rollout.speculative.lookup.lengths=[2,4]", "eval.at_start=false", "eval.at_end=false"]
    plain_cfg = compose_config([*TINY_OVERRIDES, f"run_dir={tmp_path / 'plain'}", "+recipe=grpo", *over])
    plain = build_trainer(plain_cfg, tmp_path / "plain")
    spec = make_trainer("+recipe=grpo", "rollout.speculative.enable=true", *over)
    keys = ("reward/mean", "response_length/mean", "response_length/max", "acc/mean")
    first = [spec.train_step(), plain.train_step()]
    assert first[0]["spec/sd_steps"] > 0
    for k in keys:
        assert first[0][k] == first[1][k], k
    spec.save()
    second, plain_second = spec.train_step(), plain.train_step()
    for k in keys:
        assert second[k] == plain_second[k], k
    resumed = make_trainer("+recipe=grpo", "rollout.speculative.enable=true", *over)
    resumed.maybe_resume()
    again = resumed.train_step()
    for k in (*keys, "actor/pg_loss"):
        assert again[k] == pytest.approx(second[k], abs=1e-6), k
