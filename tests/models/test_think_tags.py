"""``reward.think_tags`` (issue 19.2): a model that never closes ``</think>`` under
``reward.require_think_close=true`` stops the run (or switches the requirement off), and the
tag-based methods stop at start on a model whose prompt never opens ``<think>``."""

import pytest

from conftest import compose_config
from rlspec.errors import ConfigError, TrainingError
from rlspec.trainers.think_tags import ThinkTags, closes_think, prompt_has_think

CLOSED = "<think>\n2+2 is 4, check: 4.\n</think>\nThe answer is \\boxed{4}."
UNTAGGED = ["The answer is \\boxed{4}.", "Let me think. 2 + 2 = 4, so 4.", "I think it's five"]


class Tok:
    def __init__(self, chat_template):
        self.chat_template = chat_template


PLAIN_CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ 'Assistant:' }}"
THINK_CHAT = PLAIN_CHAT + "{{ '<think>\\n' }}"


def tags(*overrides, template=PLAIN_CHAT, prompt="Q?", hooks=()):
    return ThinkTags(compose_config(["reward=correctness", *overrides]), Tok(template), prompt, hooks)


def test_detection_of_hand_made_responses_and_prompts():
    assert closes_think([CLOSED, *UNTAGGED]) == 1 and closes_think(UNTAGGED) == 0
    assert closes_think(["<think> never closed"]) == 0
    assert prompt_has_think(Tok(THINK_CHAT), "Q?") and not prompt_has_think(Tok(PLAIN_CHAT), "Q?")
    assert prompt_has_think(Tok(None), "User: Q?\nAssistant: <think>")  # r1_zero: the prompt opens it
    assert not prompt_has_think(Tok(None), None)


def test_require_stops_on_the_first_responses_naming_the_key():
    t = tags("reward.require_think_close=true")
    with pytest.raises(TrainingError) as err:
        t.require_close(UNTAGGED, "step 1")
    msg = str(err.value)
    assert "none of the 3 responses of step 1 that ended before the length limit" in msg and "set reward.require_think_close=false" in msg
    assert "reward.think_tags=auto" in msg and "\n" not in msg


def test_one_closed_response_decides_for_the_run():
    t = tags("reward.require_think_close=true")
    assert t.require_close([CLOSED, *UNTAGGED], "the eval at step 0") is True
    assert t.require_close(UNTAGGED, "step 1") is True  # decided once, on the first responses


def test_auto_warns_once_and_switches_the_requirement_off():
    t = tags("reward.require_think_close=true", "reward.think_tags=auto")
    with pytest.warns(UserWarning, match="switched off for this run"):
        assert t.require_close(UNTAGGED, "step 1") is False
    assert t.cfg.reward.require_think_close is False  # rewards, hooks and evals read it there
    assert t.require_close([CLOSED], "step 2") is False


def test_off_and_not_required_check_nothing():
    assert tags("reward.require_think_close=true", "reward.think_tags=off").require_close(UNTAGGED, "step 1") is True
    assert tags().require_close(UNTAGGED, "step 1") is False


def test_tag_methods_stop_at_start_without_think_in_the_prompt():
    with pytest.raises(ConfigError, match=r"HBPO's budget prefill after <think> need.*reward.think_tags=auto"):
        tags(hooks=["hbpo"]).check_start()
    with pytest.raises(ConfigError, match="AnytimeReasoner's cut at </think>"):
        tags(hooks=["anytime", "palu"]).check_start()
    tags(hooks=["hbpo"], template=THINK_CHAT).check_start()  # the chat template opens the thinking
    tags(hooks=["hbpo"], template=None, prompt="User: Q\nAssistant: <think>").check_start()  # r1_zero
    tags(hooks=["palu"]).check_start()  # no tag-based method
    tags("reward.think_tags=off", hooks=["hbpo"]).check_start()
    with pytest.warns(UserWarning, match="training anyway"):
        tags("reward.think_tags=auto", hooks=["hbpo"]).check_start()


def test_truncated_responses_leave_the_decision_to_later_ones():
    """A model that thinks in tags may not reach </think> within a short budget: responses cut at
    the length limit decide nothing; the first finished ones do."""
    t = tags("reward.require_think_close=true")
    assert t.require_close(UNTAGGED, "the eval at step 0", ["length"] * 3) is True and not t.decided
    assert t.require_close([CLOSED, *UNTAGGED], "step 1", ["stop", "length", "length", "length"]) is True
    assert t.decided
    t = tags("reward.require_think_close=true")
    with pytest.raises(TrainingError, match="none of the 1 responses of step 1 that ended"):
        t.require_close([CLOSED, "no tags here"], "step 1", ["length", "stop"])


def test_the_auto_switch_is_kept_in_the_trainer_state():
    t = tags("reward.require_think_close=true", "reward.think_tags=auto")
    with pytest.warns(UserWarning):
        t.require_close(UNTAGGED, "step 1", ["stop"] * 3)
    resumed = tags("reward.require_think_close=true", "reward.think_tags=auto")
    resumed.load_state_dict(t.state_dict())
    assert resumed.decided and resumed.cfg.reward.require_think_close is False
    assert resumed.require_close([CLOSED], "step 2", ["stop"]) is False  # not re-decided after a resume
    old = tags("reward.require_think_close=true")
    old.load_state_dict({})  # a checkpoint from before reward.think_tags: decide again
    assert not old.decided and old.cfg.reward.require_think_close is True


def _finished(trainer):
    """Two-token responses on the tiny model cannot think and close </think>; count them as
    finished (not cut at the length limit) so they decide."""
    rollout = trainer._rollout

    def finished(prompt_ids, params):
        result = rollout(prompt_ids, params)
        result.finish_reasons = ["stop"] * len(result.finish_reasons)
        return result

    trainer._rollout = finished
    return trainer


def test_trainer_stops_at_step_one_when_no_rollout_closes_the_thinking(make_trainer):
    trainer = _finished(make_trainer("reward.require_think_close=true", "rollout.max_response_length=2",
                                     "eval.at_start=false"))
    with pytest.raises(TrainingError, match="responses of step 1 that ended before the length limit has one"):
        trainer.fit()
    assert trainer.global_step == 0


def test_trainer_with_auto_switches_and_trains(make_trainer):
    trainer = _finished(make_trainer("reward.require_think_close=true", "reward.think_tags=auto",
                                     "rollout.max_response_length=2", "eval.at_start=false", "eval.at_end=false",
                                     "trainer.steps=1"))
    with pytest.warns(UserWarning, match="reward.require_think_close is switched off"):
        trainer.fit()
    assert trainer.global_step == 1 and trainer.cfg.reward.require_think_close is False


def test_reward_last_number_fallback_grades_rollouts_and_the_heldout_eval(make_trainer, monkeypatch):
    """reward.last_number_fallback reaches every grading of a run: the rewards and the held-out eval."""
    import rlspec.evals.heldout as heldout
    import rlspec.rewards.terms as terms

    seen = []
    for module in (terms, heldout):
        real = module.grade_batch

        def spy(*args, _real=real, _where=module.__name__, **kwargs):
            seen.append((_where, kwargs.get("last_number_fallback")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "grade_batch", spy)
    trainer = make_trainer("reward.last_number_fallback=true", "trainer.steps=1", "eval.at_end=false")
    trainer.fit()
    assert {where for where, _ in seen} == {terms.__name__, heldout.__name__}
    assert all(flag is True for _, flag in seen)
