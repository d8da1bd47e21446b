"""Shared fixtures: the tiny embedded model (built once per session, cached in RLSPEC_HOME)."""

from pathlib import Path

import pytest

from rlspec.config import RLSpecConfig
from rlspec.session import compose

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
    return compose(overrides)


@pytest.fixture()
def make_trainer(tiny_model_path, tmp_path):
    """``make_trainer(*overrides, run_dir=None)``: a trainer on the tiny model (``TINY_OVERRIDES``
    first), in ``run_dir`` (default the test's ``tmp_path``)."""
    from rlspec.session import build_trainer

    def _make(*overrides, run_dir=None):
        run_dir = run_dir or tmp_path
        return build_trainer(compose_config([*TINY_OVERRIDES, f"run_dir={run_dir}", *overrides]), run_dir)

    return _make
