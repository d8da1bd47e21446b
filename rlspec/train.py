"""``python -m rlspec.train +recipe=dler`` -- the Hydra entry point of rlspec training.

Composes ``rlspec/configs/train.yaml`` (groups: model, data, rollout, trainer, reward, logger,
and an optional recipe) over the typed defaults of :mod:`rlspec.config`, saves the resolved
config in the run directory and trains (:func:`rlspec.session.run`; ``runtime=ray``: as a Ray
actor). ``--help`` lists every key with its default and help text. Errors in user input end the
run with one line naming the problem and the fix (exit code 2).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from rlspec.cli import asks_help, exit_with_error
from rlspec.config import RLSpecConfig, validate_config
from rlspec.configs import register_defaults
from rlspec.errors import RLSpecError
from rlspec.ray_runtime import run_learner
from rlspec.schema import help_text, to_dict
from rlspec.session import group_options, normalize_argv, precheck_overrides, run

USAGE = """usage: python -m rlspec.train [+recipe=NAME] [GROUP=OPTION ...] [KEY=VALUE ...]

Recipes: {recipes}
Groups: model={model}  data={data}  rollout={rollout}  trainer={trainer}
        reward={reward}  logger={logger}
Hydra's own flags (--cfg job, --info, ...) work as usual. Every key:
"""


def print_help() -> None:
    options = {g: "|".join(group_options(g)) for g in ("model", "data", "rollout", "trainer", "reward", "logger")}
    print(USAGE.format(recipes=", ".join(group_options("recipe")), **options))
    print(help_text(RLSpecConfig, "rlspec training config (key = default  [type])"))


def _task(cfg: DictConfig) -> None:
    try:
        typed = validate_config(cfg)
        resolved = to_dict(typed)
        if typed.runtime == "ray":  # the learner runs as a Ray actor; this process waits for it
            run_learner(typed, resolved, num_cpus=typed.ray.learner_cpus, num_gpus=typed.ray.learner_gpus)
        else:
            run(typed, resolved)
    except RLSpecError as err:
        exit_with_error(err)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    if asks_help(argv):
        print_help()
        return
    try:
        precheck_overrides(argv)
    except RLSpecError as err:
        exit_with_error(err)
    sys.argv = [sys.argv[0], *argv]
    register_defaults()
    hydra.main(config_path="configs", config_name="train", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
