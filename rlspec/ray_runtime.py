"""``runtime=ray``: run the learner as a Ray actor.

:func:`run_learner` connects to Ray (:func:`rlspec.rollout.ray_worker.init_ray`) and runs
:func:`rlspec.session.run` inside a :class:`LearnerActor` (placed on the
  driver's node when it can be, working directory = the driver's, so relative paths and the run
  directory mean the same as in a local run); the driver waits and returns the run's summary. The
  learner builds its rollout pool (:class:`rlspec.rollout.ray_engine.RayRolloutEngine`): the
  rollout workers are actors owned by the learner, so they die with it.

Multi-node launch (every node needs the same Python environment with rlspec installed)::

    head$    ray start --head --port=6379 --num-cpus=16 [--num-gpus=8]
    worker$  ray start --address=HEAD_IP:6379 [--num-gpus=8]
    head$    python -m rlspec.train +recipe=dler runtime=ray ray.address=auto \\
                 ray.num_rollout_workers=8 ray.gpus_per_worker=1 ray.chunk_size=16
    head$    ray stop          # on every node when done
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from rlspec.errors import ConfigError, RLSpecError
from rlspec.rollout.ray_worker import import_ray, init_ray
from rlspec.session import run

LEARNER_NAME = "rlspec-learner"


class LearnerActor:
    """Runs a whole training run (:func:`rlspec.session.run`) inside a Ray actor."""

    def __init__(self, cwd: str | None = None) -> None:
        if cwd and Path(cwd).is_dir():
            os.chdir(cwd)

    def info(self) -> dict[str, Any]:
        ray = import_ray()
        return {"pid": os.getpid(), "cwd": os.getcwd(), "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, cfg: Any, resolved: dict[str, Any]) -> dict[str, Any]:
        return run(cfg, resolved)


def _absolute_run_dir(cfg: Any, resolved: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    resolved = {**resolved, "run_dir": run_dir}
    return cfg, resolved


def run_learner(cfg: Any, resolved: dict[str, Any], *, num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict[str, Any]:
    """Train with the learner as a Ray actor; returns the run summary (as :func:`rlspec.session.run`).

    Connects with :func:`init_ray` (``cfg.ray.address`` / ``cfg.ray.namespace``) unless connected.
    The learner actor asks Ray for ``num_cpus`` / ``num_gpus``; the rollout workers it starts ask for
    ``ray.cpus_per_worker`` / ``ray.gpus_per_worker`` each, so the cluster needs the sum. An
    :class:`~rlspec.errors.RLSpecError` raised in the learner is re-raised here as itself (one line
    for the CLI); the learner and its workers are killed when this returns or fails.
    """
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(cfg.ray.address, cfg.ray.namespace)
    cfg, resolved = _absolute_run_dir(cfg, resolved)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    try:
        actor = ray.remote(LearnerActor).options(
            name=LEARNER_NAME, namespace=cfg.ray.namespace, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
            scheduling_strategy=here,
        ).remote(os.getcwd())
    except ValueError as err:  # the name is taken
        raise ConfigError(
            f"cannot start the learner actor {LEARNER_NAME!r} ({err}): another rlspec run uses "
            f"ray.namespace={cfg.ray.namespace!r} on this cluster; set ray.namespace=... to a unique name"
        ) from None
    try:
        return ray.get(actor.run.remote(cfg, resolved))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, RLSpecError):
            raise cause from None
        raise
    finally:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone
            pass
