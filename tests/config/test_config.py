"""Hydra composition, schema validation and one-line errors for bad config input."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from rlspec.config import RLSpecConfig, validate_config
from rlspec.errors import ConfigError
from rlspec.train import group_options, normalize_argv, precheck_overrides


def _compose(overrides):
    with initialize_config_module(config_module="rlspec.configs", version_base="1.3"):
        return compose(config_name="train", overrides=normalize_argv(overrides))


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_composes_and_validates(recipe):
    cfg = validate_config(_compose([f"+recipe={recipe}"]))
    assert isinstance(cfg, RLSpecConfig)
    assert cfg.run_name == recipe


def test_dler_recipe_sets_the_paper_knobs():
    cfg = validate_config(_compose(["+recipe=dler"]))
    assert cfg.trainer.adv_estimator == "batch_norm"
    assert (cfg.trainer.clip_ratio_low, cfg.trainer.clip_ratio_high) == (0.2, 0.28)
    assert cfg.trainer.filter_groups.enable and cfg.trainer.filter_groups.metric == "acc"
    assert cfg.trainer.loss_agg_mode == "token-mean"
    assert set(cfg.reward.terms) == {"correctness", "dler_truncation"}


def test_plain_and_plus_recipe_are_the_same():
    a = OmegaConf.to_container(_compose(["+recipe=dler"]))
    b = OmegaConf.to_container(_compose(["recipe=dler"]))
    assert a == b


def test_command_line_overrides_any_key():
    cfg = validate_config(_compose(["+recipe=dler", "trainer.lr=3e-6", "rollout.n=4", "reward.terms.dler_truncation.kwargs.penalty_coef=0.1"]))
    assert cfg.trainer.lr == 3e-6 and cfg.rollout.n == 4
    assert cfg.reward.terms["dler_truncation"].kwargs["penalty_coef"] == 0.1


def test_misspelled_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.lrr' \(did you mean 'trainer\.lr'\?\)"):
        precheck_overrides(["trainer.lrr=1e-5"])
    with pytest.raises(ConfigError, match="unknown config key 'rollout.temprature'"):
        precheck_overrides(["+rollout.temprature=1.0"])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'dlr' \(did you mean 'dler'\?\); available: .*dler"):
        precheck_overrides(["recipe=dlr"])


def test_free_form_reward_term_keys_are_allowed():
    precheck_overrides(["+reward.terms.format.weight=0.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.clip_ratio_c=0.5", "trainer.clip_ratio_c"),
        ("trainer.adv_estimator=grpoo", "did you mean 'grpo'"),
        ("trainer.lr=abc", "trainer.lr"),
        ("rollout.n=0", "rollout.n"),
        ("trainer.mini_batch_size=5", "divisible"),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_compose([override]))


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlspec.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_misspelled_key_is_one_clear_line():
    proc = _run_cli("+recipe=dler", "trainer.stepz=3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["rlspec: error: unknown config key 'trainer.stepz' (did you mean 'trainer.steps'?). "
                     "See all keys with: python -m rlspec.train --cfg job"]


def test_cli_bad_value_is_one_clear_line(tmp_path):
    proc = _run_cli("trainer.loss_agg_mode=token_mean", f"run_dir={tmp_path}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "trainer.loss_agg_mode='token_mean'" in lines[0] and "token-mean" in lines[0]
