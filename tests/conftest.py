"""Shared fixtures: the tiny embedded model (built once per session, cached in RLSPEC_HOME)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from rlspec.config import RLSpecConfig, validate_config
from rlspec.train import normalize_argv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from rlspec.embedded import EmbeddedModelConfig, get_embedded_model_path

    return get_embedded_model_path(EmbeddedModelConfig.tiny(), progress=False)


# small, fast settings for trainer tests on the tiny embedded model
TINY_OVERRIDES = [
    "model.embedded_preset=tiny",
    "rollout.n=4",
    "rollout.max_response_length=96",
    "trainer.prompts_per_step=4",
    "trainer.micro_batch_size=8",
    "trainer.steps=2",
    "trainer.save_every=1",
    "eval.num_problems=8",
    "eval.samples_per_problem=1",
    "eval.max_new_tokens=96",
    "logger.progress=off",
    "logger.backends=[jsonl]",
]


def compose_config(overrides: list[str]) -> RLSpecConfig:
    with initialize_config_module(config_module="rlspec.configs", version_base="1.3"):
        return validate_config(compose(config_name="train", overrides=normalize_argv(overrides)))
