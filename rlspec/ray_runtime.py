"""``runtime=ray``: connect to Ray and run the learner as a Ray actor.

* :func:`init_ray` starts a private local Ray instance (``ray.address`` unset) or joins a running
  cluster (``ray.address=auto`` on a cluster node, ``ray.address=ray://head:10001`` through Ray
  Client, or ``host:6379``).
* :func:`run_learner` runs :func:`rlspec.train.run` inside a :class:`LearnerActor` (placed on the
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
from rlspec.rollout.ray_engine import import_ray

LEARNER_NAME = "rlspec-learner"


def init_ray(address: str | None = None, namespace: str = "rlspec", num_cpus: int | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Connect this process to Ray; a no-op (returning the same summary) when already connected.

    ``address=None`` starts a new local instance (``num_cpus`` caps it; default: all cores), any
    other value joins that cluster (``"auto"``: the cluster started with ``ray start`` on this
    machine). ``kwargs`` go to ``ray.init`` (e.g. ``include_dashboard=True``). Returns
    ``{"started": bool, "address": ..., "namespace": ..., "resources": {...}}``; ``started`` is True
    only when this call started a local instance (its caller should ``ray.shutdown()`` it).
    """
    ray = import_ray()
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return {"started": False, "address": getattr(ctx, "gcs_address", None), "namespace": ctx.namespace,
                "resources": ray.cluster_resources()}
    opts: dict[str, Any] = {"namespace": namespace, "log_to_driver": True}
    if address in (None, "", "local"):
        opts.update(address="local", include_dashboard=False)
        if num_cpus is not None:
            opts["num_cpus"] = int(num_cpus)
    else:
        if num_cpus is not None:
            raise ConfigError("num_cpus applies only to a local Ray instance; with ray.address set, the "
                              "cluster's resources are given to `ray start --num-cpus=...` on each node")
        opts["address"] = address
        _check_reachable(address)
    opts.update(kwargs)
    try:
        ray.init(**opts)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address in (None, "", "local"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot join the Ray cluster at ray.address={address!r} ({first}); start it with "
            "`ray start --head` (then ray.address=auto on that node) or unset ray.address for a local instance"
        ) from None
    ctx = ray.get_runtime_context()
    return {"started": address in (None, "", "local"), "address": getattr(ctx, "gcs_address", None),
            "namespace": ctx.namespace, "resources": ray.cluster_resources()}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on ``host:port`` / ``ray://host:port`` nobody listens on (``ray.init`` would retry
    for minutes). ``auto`` is left to Ray (it fails at once when no local cluster is running)."""
    import socket

    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        port_num = int(port)
    except ValueError:
        raise ConfigError(f"ray.address={address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT'") from None
    try:
        with socket.create_connection((host.strip("[]"), port_num), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at ray.address={address!r} ({err.strerror or err}); start it with "
            "`ray start --head --port=6379` (then ray.address=auto on that node, HEAD_IP:6379 elsewhere) "
            "or unset ray.address for a local instance"
        ) from None


class LearnerActor:
    """Runs a whole training run (:func:`rlspec.train.run`) inside a Ray actor."""

    def __init__(self, cwd: str | None = None) -> None:
        if cwd and Path(cwd).is_dir():
            os.chdir(cwd)

    def info(self) -> dict[str, Any]:
        ray = import_ray()
        return {"pid": os.getpid(), "cwd": os.getcwd(), "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, cfg: Any, resolved: dict[str, Any]) -> dict[str, Any]:
        from rlspec.train import run

        return run(cfg, resolved)


def _absolute_run_dir(cfg: Any, resolved: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    resolved = {**resolved, "run_dir": run_dir}
    return cfg, resolved


def run_learner(cfg: Any, resolved: dict[str, Any], *, num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict[str, Any]:
    """Train with the learner as a Ray actor; returns the run summary (as :func:`rlspec.train.run`).

    Connects with :func:`init_ray` (``cfg.ray.address`` / ``cfg.ray.namespace``) unless connected.
    The learner actor asks Ray for ``num_cpus`` / ``num_gpus``; the rollout workers it starts ask for
    ``ray.cpus_per_worker`` / ``ray.gpus_per_worker`` each, so the cluster needs the sum. An
    :class:`~rlspec.errors.RLSpecError` raised in the learner is re-raised here as itself (one line
    for the CLI); the learner and its workers are killed when this returns or fails.
    """
    ray = import_ray()
    init_ray(cfg.ray.address, cfg.ray.namespace)
    cfg, resolved = _absolute_run_dir(cfg, resolved)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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


# ------------------------------------------------------------------- the drafter trainer as an actor


class SpotTrainerActor:
    """TLT's spot trainer (:class:`~rlspec.rollout.spot_trainer.SpotDrafterTrainer`) in its own actor:
    a private copy of the target (for the drafter's shared embedding / LM head) and of the drafter."""

    def __init__(self, spec: dict[str, Any], target_state: dict, target_version: int, drafter_config: Any,
                 drafter_state: dict, drafter_version: int, spot_kwargs: dict[str, Any],
                 options: dict[str, Any]) -> None:
        import torch

        from rlspec.rollout.drafter import EagleDrafter
        from rlspec.rollout.ray_engine import build_model
        from rlspec.rollout.spot_trainer import SpotDrafterTrainer

        torch.set_num_threads(max(1, int(options.get("num_threads") or 1)))
        device = "cuda" if options.get("gpus", 0) > 0 and torch.cuda.is_available() else "cpu"
        self.model = build_model(spec, target_state, device)
        self.target_version = int(target_version)
        self.drafter = EagleDrafter(drafter_config, self.model, seed=None)
        self.drafter.load_state_dict(drafter_state)
        self.drafter.version = int(drafter_version)
        self._shipped_version = self.drafter.version  # the version the learner's drafter has
        self.spot = SpotDrafterTrainer(self.drafter, **spot_kwargs)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "target_version": self.target_version, "drafter_version": self.drafter.version,
                "num_pairs": self.spot.buffer.num_pairs, "training_steps": self.spot.trainer.total_steps}

    def load_target(self, state: dict, version: int) -> int:
        import torch

        if self.spot._thread is not None:  # noqa: SLF001 -- the target must not change under training
            raise RLSpecError("the drafter trainer is running: stop() it before the target weights change")
        from rlspec.rollout.ray_engine import unpack_state

        with torch.no_grad():
            self.model.load_state_dict(unpack_state(state))
        self.target_version = int(version)
        return self.target_version

    def load_drafter(self, state: dict, version: int) -> None:
        import torch

        with self.drafter.lock, torch.no_grad():
            self.drafter.load_state_dict(state)
            self.drafter.version = int(version)
        self._shipped_version = int(version)
        self.spot.trainer.sync_from_drafter()

    def state_dict(self) -> dict[str, Any]:
        return self.spot.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spot.load_state_dict(state)

    def add_responses(self, items: list[tuple]) -> int:
        return sum(bool(self.spot.buffer.add_response(*item)) for item in items)

    def start(self) -> bool:
        self.spot.start()
        return self.spot._thread is not None  # noqa: SLF001

    def stop(self, step: int) -> tuple[dict[str, float], dict | None, int]:
        from rlspec.rollout.ray_engine import state_dict_cpu

        metrics = self.spot.stop(step)
        state = None
        with self.drafter.lock:
            if self.drafter.version != self._shipped_version:  # published since: ship the new weights back
                state = state_dict_cpu(self.drafter)
                self._shipped_version = self.drafter.version
            version = self.drafter.version
        return metrics, state, version


class _BufferProxy:
    """``spot.buffer`` for the trainer: ``add_response`` validates here and queues (one remote call
    per flush instead of one per response)."""

    def __init__(self, owner: "RemoteSpotTrainer") -> None:
        self._owner = owner
        self._queue: list[tuple] = []

    def add_response(self, step: int, prompt_ids, response_ids, response_hidden) -> bool:
        from rlspec.errors import DataError

        r = len(response_ids)
        if response_hidden.dim() != 2 or response_hidden.shape[0] != r:
            raise DataError(f"drafter buffer: response_hidden must be [len(response_ids)={r}, H], "
                            f"got {tuple(response_hidden.shape)}")
        if r < 2 or not prompt_ids:
            return False  # what DrafterBuffer.add_response returns for these
        hidden = response_hidden.detach().to("cpu")
        self._queue.append((int(step), [int(t) for t in prompt_ids], [int(t) for t in response_ids],
                            hidden.clone() if hidden.is_inference() else hidden))
        return True

    def flush(self) -> int:
        if not self._queue:
            return 0
        items, self._queue = self._queue, []
        return import_ray().get(self._owner.actor.add_responses.remote(items))

    @property
    def num_pairs(self) -> int:
        self.flush()
        return int(import_ray().get(self._owner.actor.info.remote())["num_pairs"])


class _TrainerProxy:
    def __init__(self, owner: "RemoteSpotTrainer") -> None:
        self._owner = owner

    def sync_from_drafter(self) -> None:
        """The learner's drafter got new weights (a resumed checkpoint): send them to the actor."""
        self._owner.push_drafter()

    @property
    def total_steps(self) -> int:
        return int(import_ray().get(self._owner.actor.info.remote())["training_steps"])


class RemoteSpotTrainer:
    """:class:`~rlspec.rollout.spot_trainer.SpotDrafterTrainer`'s interface, with the training done
    in a Ray actor (:class:`SpotTrainerActor`, named ``rlspec-drafter-trainer``) that can have its
    own resources (``num_cpus`` / ``num_gpus``). What the GRPO trainer calls:

    * ``buffer.add_response(step, prompt, response, hidden)`` -- queued, sent at the next
      ``start`` / ``stop``;
    * ``start()`` -- sends the queued responses and the current target weights (the rollout pool's
      object-store copy when ``engine`` is a :class:`~rlspec.rollout.ray_engine.RayRolloutEngine`,
      else a fresh copy of ``model`` on every start), then starts training in the actor's
      background thread;
    * ``stop(step)`` -- preempts it and copies the published drafter weights and ``version`` into
      the learner's ``drafter`` (under its lock): the engine ships them with the next
      ``update_weights``, and checkpoints save them, exactly as with the local spot trainer;
    * ``trainer.sync_from_drafter()`` -- after a resume loaded the learner's drafter.
    """

    def __init__(self, drafter: Any, model: Any, *, engine: Any = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 namespace: str = "rlspec", name: str = "rlspec-drafter-trainer", **spot_kwargs: Any) -> None:
        from rlspec.rollout.ray_engine import learner_spec, state_dict_cpu

        ray = import_ray()
        self.drafter = drafter
        self.model = model
        self.engine = engine if engine is not None and hasattr(engine, "weights_ref") else None
        self.published_step = 0
        version, ref = self._target_ref()
        spec = learner_spec(model)
        with drafter.lock:
            dstate = state_dict_cpu(drafter)
            dversion = int(drafter.version)
        options = {"num_threads": max(1, int(num_cpus)), "gpus": num_gpus}
        self.actor = ray.remote(SpotTrainerActor).options(
            name=name, namespace=namespace, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
        ).remote(spec, ref, version, drafter.config, dstate, dversion, dict(spot_kwargs), options)
        self._target_version = version
        self.buffer = _BufferProxy(self)
        self.trainer = _TrainerProxy(self)
        ray.get(self.actor.info.remote())  # raises the construction error, if any

    def _target_ref(self) -> tuple[int, Any]:
        if self.engine is not None:
            return self.engine.weights_ref()
        from rlspec.rollout.ray_engine import pack_state

        self._own_version = getattr(self, "_own_version", -1) + 1  # no shared copy: ship on every start
        return self._own_version, import_ray().put(pack_state(self.model.state_dict()))

    def push_drafter(self) -> None:
        from rlspec.rollout.ray_engine import state_dict_cpu

        self.buffer.flush()
        with self.drafter.lock:
            state, version = state_dict_cpu(self.drafter), int(self.drafter.version)
        import_ray().get(self.actor.load_drafter.remote(state, version))

    def start(self) -> None:
        ray = import_ray()
        self.buffer.flush()
        if self.engine is None or self.engine.weights_ref()[0] != self._target_version:
            version, ref = self._target_ref()
            ray.get(self.actor.load_target.remote(ref, version))
            self._target_version = version
        ray.get(self.actor.start.remote())

    def stop(self, step: int) -> dict[str, float]:
        import torch

        metrics, state, version = import_ray().get(self.actor.stop.remote(step))
        if state is not None:
            with self.drafter.lock, torch.no_grad():
                self.drafter.load_state_dict(state)
                self.drafter.version = int(version)
            self.published_step = step
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The actor's :meth:`SpotDrafterTrainer.state_dict` (queued responses sent first)."""
        self.buffer.flush()
        state = import_ray().get(self.actor.state_dict.remote())
        return {**state, "published_step": self.published_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import_ray().get(self.actor.load_state_dict.remote(dict(state)))
        self.published_step = int(state["published_step"])

    def shutdown(self) -> None:
        try:
            import_ray().kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone
            pass
