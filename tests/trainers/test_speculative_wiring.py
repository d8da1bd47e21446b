"""Which drafter a run gets (rlspec.session): speculation needs no drafter and no warm-up, and on
a CPU the EAGLE drafter joins only where it does not take the rollout's cores."""

import pytest
import torch
from conftest import TINY_OVERRIDES, compose_config

from rlspec.errors import ModelLoadError
from rlspec.models import load_causal_lm
from rlspec.rollout.speculative.eagle import EagleDrafter
from rlspec.session import load_drafter, spot_training_allowed


def _cfg(tiny_model_path, *over):
    return compose_config([*TINY_OVERRIDES, f"model.path={tiny_model_path}", "rollout.speculative.enable=true", *over])


def test_cpu_runs_draft_with_the_lookups_alone_and_say_so(tiny_model_path, capsys):
    cfg = _cfg(tiny_model_path)
    model = load_causal_lm(tiny_model_path, "float32")
    assert not spot_training_allowed(cfg, torch.device("cpu"))
    assert load_drafter(cfg, model, None, tiny_model_path, [], trains_online=False) is None
    assert "drafting with self, group, history" in capsys.readouterr().out


def test_eagle_alone_on_a_cpu_names_the_ways_out(tiny_model_path):
    cfg = _cfg(tiny_model_path, "rollout.speculative.sources=[eagle]")
    model = load_causal_lm(tiny_model_path, "float32")
    with pytest.raises(ModelLoadError, match="drafter_path=DIR.*online.on_cpu=true"):
        load_drafter(cfg, model, None, tiny_model_path, [], trains_online=False)


def test_a_drafter_that_trains_online_starts_fresh_without_a_warm_up(tiny_model_path):
    cfg = _cfg(tiny_model_path, "rollout.speculative.online.on_cpu=true")
    assert spot_training_allowed(cfg, torch.device("cpu"))
    assert spot_training_allowed(_cfg(tiny_model_path), torch.device("cuda"))
    assert not spot_training_allowed(_cfg(tiny_model_path, "rollout.speculative.online.enable=false"),
                                     torch.device("cuda"))
    model = load_causal_lm(tiny_model_path, "float32")
    drafter = load_drafter(cfg, model, None, tiny_model_path, [], trains_online=True)
    assert isinstance(drafter, EagleDrafter)
    assert drafter.lm_head is model.lm_head  # shared head and embeddings, a fresh layer
