"""Resuming a run checks its saved config; keys a newer rlspec added with their defaults are not drift."""

from rlspec.session import config_differences


def test_changed_value_is_a_difference():
    saved = {"trainer": {"lr": 1e-5, "steps": 40}}
    current = {"trainer": {"lr": 2e-5, "steps": 40}}
    assert config_differences(saved, current) == ["trainer.lr: 1e-05 -> 2e-05"]


def test_new_key_at_its_default_is_not_a_difference():
    saved = {"trainer": {"lr": 1e-5}}
    current = {"trainer": {"lr": 1e-5}, "anytime": {"enable": False, "n_summary": 4}}
    defaults = {"anytime": {"enable": False, "n_summary": 4}}
    assert config_differences(saved, current, defaults) == []
    # ... but a new key set away from its default is
    current["anytime"]["enable"] = True
    assert config_differences(saved, current, defaults) == ["anytime.enable: None -> True"]
    # ... and without the schema defaults every new key counts
    assert len(config_differences(saved, {"trainer": {"lr": 1e-5}, "anytime": {"enable": False}})) == 1
