"""User reward functions (TRL- and verl-style) loaded from files and modules."""

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlspec.errors import ConfigError, TrainingError
from rlspec.rewards import REWARD_TERMS, RewardBatch, build_reward_terms, compute_rewards, load_custom_reward
from rlspec.rewards.custom import register_custom_reward


def write(tmp_path, source, name="my_rewards.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def make_batch(**overrides):
    fields = dict(
        prompts=["p0", "p1", "p2"],
        completions=["a</think>\\boxed{4}", "a</think>\\boxed{5}", "cut off"],
        completion_ids=[[1, 2, 3, 4], [1, 2], [1] * 8],
        finish_reasons=["stop", "stop", "length"],
        answers=["4", "4", "4"],
        correct=[True, False, False],
        group_ids=[0, 0, 0],
        step=7,
        columns={"level": [1, 2, 3]},
    )
    fields.update(overrides)
    return RewardBatch(**fields)


TRL_SOURCE = """
    SEEN = {}

    def brevity(prompts, completions, completion_ids, **kwargs):
        SEEN.update(kwargs, prompts=prompts)
        # 1 - len/10 for correct answers, no opinion (None) on wrong ones
        return [1.0 - len(ids) / 10 if ok else None for ids, ok in zip(completion_ids, kwargs["correct"])]

    def by_level(completions, level):  # no **kwargs: only the named inputs are passed
        return [float(lv) for lv in level]
"""


def test_trl_style(tmp_path, caplog):
    term = load_custom_reward(write(tmp_path, TRL_SOURCE), "brevity")
    assert term.style == "trl"
    with caplog.at_level(logging.WARNING):
        assert term(make_batch()) == pytest.approx([0.6, 0.0, 0.0])
    assert "returned None for 2 of 3 completions" in caplog.text
    seen = term.fn.__globals__["SEEN"]
    assert seen["answer"] == ["4", "4", "4"]
    assert seen["finish_reasons"] == ["stop", "stop", "length"]
    assert seen["correct"] == [True, False, False]
    assert seen["step"] == 7 and seen["group_ids"] == [0, 0, 0] and seen["level"] == [1, 2, 3]
    assert seen["prompts"] == ["p0", "p1", "p2"]


def test_trl_style_without_var_kwargs(tmp_path):
    term = load_custom_reward(write(tmp_path, TRL_SOURCE), "by_level")
    assert term(make_batch()) == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="cannot call TRL-style by_level.*level"):
        term(make_batch(columns={}))


VERL_SOURCE = """
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        hit = float(("boxed{" + ground_truth + "}") in solution_str)
        return {"score": hit + extra_info["level"] / 10, "acc": hit, "src": data_source}

    def plain(data_source, solution_str, ground_truth, extra_info=None):
        assert data_source == "rlspec" and extra_info["index"] in (0, 1, 2)
        assert extra_info["finish_reason"] in ("stop", "length") and extra_info["step"] == 7
        return int(ground_truth in solution_str)

    def no_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"acc": 1.0}

    def short(src, text, gt):  # other names: needs style=verl, called positionally
        return 1.0 if gt in text else -1.0
"""


def test_verl_style(tmp_path):
    path = write(tmp_path, VERL_SOURCE)
    term = load_custom_reward(path, "compute_score")
    assert term.style == "verl"
    assert term(make_batch()) == pytest.approx([1.1, 0.2, 0.3])
    assert load_custom_reward(path, "plain")(make_batch()) == [1.0, 0.0, 0.0]


def test_verl_style_explicit_positional(tmp_path):
    path = write(tmp_path, VERL_SOURCE)
    with pytest.raises(ConfigError, match="cannot tell whether short.*set reward.custom.style=trl or .*=verl"):
        load_custom_reward(path, "short")
    term = load_custom_reward(path, "short", style="verl")
    assert term(make_batch()) == [1.0, -1.0, -1.0]


def test_verl_data_source_and_extra_info_columns(tmp_path):
    path = write(tmp_path, """
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return len(data_source) + extra_info["split_id"] + extra_info["level"]
    """)
    batch = make_batch(columns={"data_source": ["ab", "abc", "a"], "extra_info": [{"split_id": 10}] * 3,
                                "level": [1, 2, 3]})
    assert load_custom_reward(path, "compute_score")(batch) == [13.0, 15.0, 14.0]


def test_module_path(tmp_path, monkeypatch):
    package = tmp_path / "rlspec_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(package, VERL_SOURCE, name="scores.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    term = load_custom_reward("rlspec_test_pkg.scores", "plain")
    assert term.source == "module rlspec_test_pkg.scores"
    assert term(make_batch()) == [1.0, 0.0, 0.0]


def test_register_and_compute_rewards(tmp_path):
    path = write(tmp_path, TRL_SOURCE)
    terms = build_reward_terms(
        {"terms": {"correctness": {"weight": 1.0}}, "custom": {"path": path, "name": "brevity", "weight": 0.5}}
    )
    assert terms == {"correctness": {"weight": 1.0, "kwargs": {}}, "custom:brevity": {"weight": 0.5, "kwargs": {}}}
    batch = make_batch(prompts=["q", "q"], completions=["a</think>\\boxed{4}", "a</think>\\boxed{3}"],
                       completion_ids=[[1, 2], [1, 2, 3]], finish_reasons=["stop", "stop"], answers=["4", "4"],
                       correct=[], group_ids=[0, 0], columns={})
    totals, raw, correct = compute_rewards(batch, terms)
    assert correct == [True, False]
    assert raw["custom:brevity"] == pytest.approx([0.8, 0.0])
    assert totals == pytest.approx([1.4, 0.0])  # 1 + 0.5 * 0.8, and 0 + 0.5 * 0 (None -> 0)

    # Re-registering the same name (e.g. a notebook re-run) re-points the registered term.
    other = write(
        tmp_path, "def brevity(prompts, completions, completion_ids, **kw):\n    return [2.0] * len(prompts)\n", "other.py"
    )
    assert register_custom_reward(other, "brevity") == "custom:brevity"
    assert REWARD_TERMS.get("custom:brevity")(make_batch()) == [2.0, 2.0, 2.0]


def test_build_reward_terms_checks_everything_up_front(tmp_path):
    assert build_reward_terms({"terms": {"correctness": None}, "custom": {"path": None, "name": None}}) == {
        "correctness": {"weight": 1.0, "kwargs": {}}
    }
    assert build_reward_terms({"terms": None}) == {}
    with pytest.raises(ConfigError, match="unknown reward term 'lenght'"):
        build_reward_terms({"terms": {"lenght": {}}})
    with pytest.raises(ConfigError, match=r"reward.terms.dler_truncation.kwargs \['coeff'\]"):
        build_reward_terms({"terms": {"dler_truncation": {"kwargs": {"coeff": 0.1}}}})
    with pytest.raises(ConfigError, match="reward.terms.custom.weight must be a finite number"):
        build_reward_terms({"custom": {"path": write(tmp_path, TRL_SOURCE), "name": "brevity", "weight": "lots"}})


def test_nan_from_custom_reward_names_the_term(tmp_path):
    path = write(tmp_path, "def r(prompts, completions, completion_ids, **kw):\n    return [float('nan')] * len(prompts)")
    terms = build_reward_terms({"terms": {}, "custom": {"path": path, "name": "r", "weight": 1.0}})
    with pytest.raises(ConfigError, match="'custom:r' returned nan for completion 0"):
        compute_rewards(make_batch(), terms)


@pytest.mark.parametrize(
    "source, name, message",
    [
        (TRL_SOURCE, "missing_fn", r"has no function 'missing_fn' \(functions there: brevity, by_level\).*fix"),
        ("x = 3\n", "x", "has a non-callable 'x'"),
        ("def f(:\n", "f", "importing .*my_rewards.py failed with SyntaxError.*fix"),
        ("import not_a_real_package_xyz\n", "f", "failed with ModuleNotFoundError"),
        ("def f(a, b):\n    return [0.0]\n", "f", "cannot tell whether f\\(\\) in .*my_rewards.py"),
    ],
)
def test_load_errors_are_one_line(tmp_path, source, name, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_custom_reward(write(tmp_path, source), name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "source, message",
    [
        ("def r(prompts, completions, completion_ids, **kw):\n    return [1.0]\n",
         r"r\(\) in .*my_rewards.py returned 1 values for 3 completions; fix: return one float"),
        ("def r(prompts, completions, completion_ids, **kw):\n    return 1.0\n", "returned a float; fix"),
        ("def r(prompts, completions, completion_ids, **kw):\n    return ['high'] * 3\n",
         "returned 'high' for completion 0"),
        ("def r(data_source, solution_str, ground_truth, extra_info=None):\n    return {'acc': 1}\n",
         "returned a dict without 'score'"),
    ],
)
def test_bad_return_values(tmp_path, source, message):
    term = load_custom_reward(write(tmp_path, source), "r")
    with pytest.raises(ConfigError, match=message) as info:
        term(make_batch())
    assert "\n" not in str(info.value)


def test_missing_file_and_module(tmp_path):
    with pytest.raises(ConfigError, match=r"no file '.*nope.py' \(looked for .*nope.py\); fix"):
        load_custom_reward(str(tmp_path / "nope.py"), "f")
    with pytest.raises(ConfigError, match="no module 'rlspec_no_such_module' on the Python path; fix"):
        load_custom_reward("rlspec_no_such_module", "f")
    with pytest.raises(ConfigError, match="reward.custom.style must be one of auto, trl, verl"):
        load_custom_reward(str(tmp_path / "nope.py"), "f", style="openrlhf")
    with pytest.raises(ConfigError, match="reward.custom.name is not set"):
        build_reward_terms({"custom": {"path": str(tmp_path / "nope.py"), "name": None}})


def test_build_terms_from_config_objects(tmp_path):
    import dataclasses

    from omegaconf import OmegaConf

    from rlspec.config import CustomRewardConfig, RewardConfig, RewardTermConfig

    path = write(tmp_path, VERL_SOURCE)
    custom = CustomRewardConfig(path=path, name="plain", weight=0.25, style="verl")
    as_dataclass = RewardConfig(terms={"correctness": RewardTermConfig(weight=1.0)}, custom=custom)
    as_omegaconf = OmegaConf.create(dataclasses.asdict(as_dataclass))  # a composed (DictConfig) reward section
    for reward_cfg in (as_dataclass, as_omegaconf):
        terms = build_reward_terms(reward_cfg)
        assert terms == {"correctness": {"weight": 1.0, "kwargs": {}}, "custom:plain": {"weight": 0.25, "kwargs": {}}}
    batch = make_batch(prompts=["q"] * 2, completions=["</think>\\boxed{4}", "</think>\\boxed{3}"],
                       completion_ids=[[1], [1]], finish_reasons=["stop", "stop"], answers=["4", "4"], correct=[],
                       group_ids=[0, 0], columns={})
    totals, raw, _ = compute_rewards(batch, terms)
    assert raw == {"correctness": [1.0, 0.0], "custom:plain": [1.0, 0.0]}
    assert totals == pytest.approx([1.25, 0.0])


# ------------------------------------------------------------------ reward.custom.timeout_s
MATH_VERIFY_TRL = """
    from math_verify import parse, verify

    def accuracy(completions, answer, **kwargs):  # TRL's accuracy_reward, in short
        return [float(verify(parse(gold), parse(c))) for c, gold in zip(completions, answer)]
"""


def test_a_trl_reward_calling_math_verify_runs_under_the_default_timeout(tmp_path):
    """math-verify's parse/verify refuse any thread but the main one: the call must stay there."""
    before = signal.getsignal(signal.SIGUSR1)
    term = load_custom_reward(write(tmp_path, MATH_VERIFY_TRL), "accuracy", timeout_s=300)
    assert term(make_batch()) == [1.0, 0.0, 0.0]
    assert signal.getsignal(signal.SIGUSR1) is before  # the watchdog's handler is gone again


HANGING = {
    "busy_loop": "def hang(completions, **kw):\n    while True:\n        pass\n",
    "sleep": "import time\ndef hang(completions, **kw):\n    time.sleep(20)\n",
    # swallows the first SIGUSR1, then hangs again: the watchdog re-sends it
    "bare_except": ("import time\ndef hang(completions, **kw):\n    try:\n        while True:\n            pass\n"
                    "    except:\n        pass\n    time.sleep(20)\n    return [1.0] * len(completions)\n"),
    # swallows it and returns late: still a timeout
    "bare_except_returns": ("import time\ndef hang(completions, **kw):\n    try:\n        time.sleep(20)\n"
                            "    except:\n        pass\n    return [1.0] * len(completions)\n"),
}


@pytest.mark.parametrize("name", list(HANGING))
def test_a_hanging_reward_is_stopped_in_the_main_thread(tmp_path, name):
    before = signal.getsignal(signal.SIGUSR1)
    term = load_custom_reward(write(tmp_path, HANGING[name]), "hang", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"did not return within reward\.custom\.timeout_s=0\.5 s \(training step 8"):
        term(make_batch())
    assert time.monotonic() - start < 10
    assert signal.getsignal(signal.SIGUSR1) is before


def test_outside_the_main_thread_a_hanging_reward_is_abandoned_in_a_thread(tmp_path):
    term = load_custom_reward(write(tmp_path, HANGING["sleep"]), "hang", timeout_s=0.3)
    caught = []

    def call():
        try:
            term(make_batch())
        except TrainingError as err:
            caught.append(str(err))

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(30)
    assert len(caught) == 1 and "did not return within reward.custom.timeout_s=0.3 s" in caught[0]


AROUND_THE_DEADLINE = """
import random, signal, sys, textwrap, time
from pathlib import Path
from rlspec.errors import TrainingError
from rlspec.rewards import RewardBatch, load_custom_reward
path = Path(sys.argv[1]) / "late.py"
path.write_text("import time\\ndef late(completions, **kw):\\n    end = time.monotonic() + kw['step'] / 1000\\n"
                "    while time.monotonic() < end:\\n        pass\\n    return [0.0] * len(completions)\\n")
term = load_custom_reward(str(path), "late", timeout_s=0.05)
outcomes = set()
for i in range(93):  # returns 15 ms early to 15 ms late, and at the deadline itself
    step = 35 + i % 31
    batch = RewardBatch(prompts=["p"], completions=["c"], completion_ids=[[1]], finish_reasons=["stop"],
                        answers=["1"], correct=[False], group_ids=[0], step=step, columns={})
    try:
        term(batch)
        outcomes.add("returned")
    except TrainingError:
        outcomes.add("timed out")
time.sleep(1.0)  # a late SIGUSR1 would kill the process here (its default action)
print(sorted(outcomes), signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)
"""


def test_a_reward_returning_around_the_deadline_never_kills_the_process(tmp_path):
    proc = subprocess.run([sys.executable, "-c", AROUND_THE_DEADLINE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "['returned', 'timed out'] True", proc.stdout
