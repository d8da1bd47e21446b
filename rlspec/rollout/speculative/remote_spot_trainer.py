"""TLT's spot trainer in its own Ray actor (``runtime=ray``), behind the local trainer's interface.

:class:`RemoteSpotTrainer` is what :class:`~rlspec.rollout.speculative.online.OnlineDrafting` sees:
``buffer.add_response``, ``start``, ``stop``, ``state_dict`` -- as for
:class:`~rlspec.rollout.speculative.spot_trainer.SpotDrafterTrainer` -- while the training runs in
:class:`SpotTrainerActor` (named ``rlspec-drafter-trainer``) with its own resources.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlspec.config import OnlineDrafterConfig
from rlspec.errors import DataError, RLSpecError
from rlspec.rollout.ray_worker import build_model, import_ray, learner_spec, pack_state, state_dict_cpu, unpack_state
from rlspec.rollout.speculative.eagle import EagleDrafter
from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer


class SpotTrainerActor:
    """TLT's spot trainer (:class:`~rlspec.rollout.speculative.spot_trainer.SpotDrafterTrainer`) in its own actor:
    a private copy of the target (for the drafter's shared embedding / LM head) and of the drafter."""

    def __init__(self, spec: dict[str, Any], target_state: dict, target_version: int, drafter_config: Any,
                 drafter_state: dict, drafter_version: int, settings: OnlineDrafterConfig, seed: int,
                 options: dict[str, Any]) -> None:
        torch.set_num_threads(max(1, int(options.get("num_threads") or 1)))
        device = "cuda" if options.get("gpus", 0) > 0 and torch.cuda.is_available() else "cpu"
        self.model = build_model(spec, target_state, device)
        self.target_version = int(target_version)
        self.drafter = EagleDrafter(drafter_config, self.model, seed=None)
        self.drafter.load_state_dict(drafter_state)
        self.drafter.version = int(drafter_version)
        self._shipped_version = self.drafter.version  # the version the learner's drafter has
        self.spot = SpotDrafterTrainer(self.drafter, settings, seed=seed)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "target_version": self.target_version, "drafter_version": self.drafter.version,
                "num_pairs": self.spot.buffer.num_pairs, "nbytes": self.spot.buffer.nbytes,
                "training_steps": self.spot.trainer.total_steps}

    def load_target(self, state: dict, version: int) -> int:
        if self.spot._thread is not None:  # noqa: SLF001 -- the target must not change under training
            raise RLSpecError("the drafter trainer is running: stop() it before the target weights change")
        with torch.no_grad():
            self.model.load_state_dict(unpack_state(state))
        self.target_version = int(version)
        return self.target_version

    def load_drafter(self, state: dict, version: int) -> None:
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

    @property
    def nbytes(self) -> int:
        """Bytes the actor's buffer holds (queued responses sent first)."""
        self.flush()
        return int(import_ray().get(self._owner.actor.info.remote())["nbytes"])


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
    """:class:`~rlspec.rollout.speculative.spot_trainer.SpotDrafterTrainer`'s interface, with the training done
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

    def __init__(self, drafter: Any, model: Any, settings: OnlineDrafterConfig | None = None, *, seed: int = 0,
                 engine: Any = None, num_cpus: float = 1.0, num_gpus: float = 0.0, namespace: str = "rlspec",
                 name: str = "rlspec-drafter-trainer") -> None:
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
        ).remote(spec, ref, version, drafter.config, dstate, dversion, settings or OnlineDrafterConfig(), seed, options)
        self._target_version = version
        self.buffer = _BufferProxy(self)
        self.trainer = _TrainerProxy(self)
        ray.get(self.actor.info.remote())  # raises the construction error, if any

    def _target_ref(self) -> tuple[int, Any]:
        if self.engine is not None:
            return self.engine.weights_ref()
        self._own_version = getattr(self, "_own_version", -1) + 1  # no shared copy: ship on every start
        return self._own_version, import_ray().put(pack_state(self.model.state_dict()))

    def push_drafter(self) -> None:
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
