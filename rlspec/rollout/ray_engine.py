"""``runtime=ray``: a pool of rollout workers (Ray actors) behind the :class:`RolloutEngine` protocol.

:class:`RayRolloutEngine` is what the trainer sees: ``generate`` / ``update_weights`` exactly as for
:class:`~rlspec.rollout.native.NativeEngine`. Behind it, ``num_workers`` Ray actors
(:class:`RolloutWorker`, named ``rlspec-rollout-{i}`` in the Ray namespace) each hold their own copy
of the policy (built from the learner model's config + a state dict shipped through the object
store), the tokenizer and a ``NativeEngine`` (with the speculative settings / EAGLE drafter when
given).

``generate``
    splits the prompts into chunks of ``chunk_size`` prompts in input order. Chunk ``k`` is sampled
    with its own seed ``chunk_seed(params.seed, k)``, so a chunk gives the same samples whichever
    worker runs it and however often it is re-run: the results depend on ``(seed, chunk_size)``
    only -- not on the number of workers, their speed, or failures. (They differ from
    ``runtime=local`` with the same seed: that engine samples all prompts from one RNG stream.)
    With ``SamplingParams.streams`` every chunk runs under the call's seed with its requests'
    stream keys instead, so a request samples what the native engine gives it locally, whatever
    ``chunk_size`` (the trainer's held-out eval and ``rlspec.eval`` pass streams).
    Chunks are handed out dynamically: a worker gets the next chunk when it returns one (at most
    ``max_inflight_per_worker`` queued per worker), so the long tail spreads over the pool instead
    of waiting on the worker that drew the long responses. Results are reassembled in input order.

fault tolerance
    a worker that dies (process killed, node lost, OOM-killed: any ``RayActorError``) is replaced
    by a new actor of the same name, built with the *current* weights, and the chunks it held are
    put back at the front of the queue; the surviving workers take them at once, the replacement
    gets chunks once it has started. As chunks are seeded independently, the step's results are
    identical to a run without the failure. More than ``max_worker_restarts`` deaths within one
    ``generate`` / ``update_weights`` call raise :class:`~rlspec.errors.TrainingError`. An error
    raised *inside* a worker (a bug, a bad setting) is not a death: it is re-raised as is.

``update_weights``
    one ``ray.put`` of the learner's state dict (CPU, as numpy arrays: the object store shares them
    zero-copy with the workers of a node); every worker copies it into its model and refreshes its
    engine. Every chunk carries the weights version (and a reference to that copy), so a worker
    never samples with stale weights: a replacement still starting during ``update_weights`` loads
    them before its first chunk. The drafter (``set_drafter``) is shipped the same way whenever its
    ``version`` changed (the spot trainer bumps it when it publishes).

``on_long_tail``
    called at most once per ``generate`` with the finished ``(prompt, response, hidden)`` samples
    (when ``return_hidden_states``; else ``[]``) at the moment the queue is empty and a worker goes
    idle -- the pool-level long tail, where TLT's spot trainer (arXiv 2511.16665, Sec. 4) starts
    training the drafter while the remaining workers finish. (With one worker there is no idle
    worker, so it is not called.) Inside each worker the ``NativeEngine`` still does its own
    long-tail switch to speculative decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch

from rlspec.config import RayConfig, RolloutConfig
from rlspec.errors import ConfigError, TrainingError
from rlspec.rollout.base import RolloutResult, SamplingParams, check_prompt_ids, merge_results, merge_stats
from rlspec.rollout.base import stream_keys
from rlspec.rollout.ray_worker import (
    import_ray,
    init_ray,
    learner_spec,
    pack_state,
    state_dict_cpu,
    worker_actor_class,
)

WORKER_NAME = "rlspec-rollout"


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk`` of a ``generate`` call seeded ``seed`` (a 63-bit hash of
    both, identical in every process), so a re-queued chunk reproduces its samples exactly."""
    digest = hashlib.sha256(f"rlspec-chunk:{int(seed)}:{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_chunks(n: int, chunk_size: int) -> list[range]:
    """Consecutive index ranges of at most ``chunk_size`` covering ``0 .. n-1`` in order."""
    if chunk_size < 1:
        raise ConfigError(f"ray.chunk_size must be >= 1, got {chunk_size}")
    return [range(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


# ---------------------------------------------------------------------------------- the pool


class RayRolloutEngine:
    """A :class:`~rlspec.rollout.base.RolloutEngine` that fans ``generate`` out to Ray actors.

    Args:
        model: the learner's torch model (updated in place by the trainer; shipped at
            :meth:`update_weights`).
        tokenizer: shipped to the workers (needed for stop strings).
        eos_token_ids: ids that end a response.
        num_workers: rollout actors (``ray.num_rollout_workers``).
        chunk_size: prompts per work item (``ray.chunk_size``): smaller = better long-tail balance,
            larger = bigger batches per worker.
        max_batch_size: the workers' engine batch size (``rollout.max_batch_size``).
        cpus_per_worker / gpus_per_worker: Ray resources of each actor; a worker with a GPU
            samples on it.
        max_worker_restarts: worker deaths tolerated within one call (``ray.max_worker_restarts``).
        namespace: the Ray namespace of the named actors ``rlspec-rollout-{i}``.
        worker_engine: the engine each worker builds (a name of :data:`rlspec.registry.ENGINES`).
        engine_kwargs: extra keyword arguments for that engine (e.g. ``speculative=...``).
        max_inflight_per_worker: chunks queued on a worker at once (1: best long-tail balance).
        name_prefix: actor names are ``f"{name_prefix}-{i}"``.
        ready_timeout_s: how long to wait for the workers to start before failing.

    Needs a connected Ray (:func:`rlspec.rollout.ray_worker.init_ray`); it is initialised locally if not.
    ``on_chunk_done(engine, worker_index, chunk_index)``, if set, is called on the driver when a
    chunk result arrives, before that worker gets its next chunk (for monitoring and fault tests).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_token_ids: Sequence[int], *,
                 num_workers: int = 2, chunk_size: int = 8, max_batch_size: int = 256, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, max_worker_restarts: int = 3, namespace: str = "rlspec",
                 worker_engine: str = "native", engine_kwargs: dict[str, Any] | None = None,
                 max_inflight_per_worker: int = 1, name_prefix: str = WORKER_NAME,
                 ready_timeout_s: float = 600.0) -> None:
        if num_workers < 1:
            raise ConfigError(f"ray.num_rollout_workers must be >= 1, got {num_workers}")
        if chunk_size < 1:
            raise ConfigError(f"ray.chunk_size must be >= 1, got {chunk_size}")
        if max_worker_restarts < 0:
            raise ConfigError(f"ray.max_worker_restarts must be >= 0, got {max_worker_restarts}")
        if max_inflight_per_worker < 1:
            raise ConfigError(f"max_inflight_per_worker must be >= 1, got {max_inflight_per_worker}")
        ray = import_ray()
        if not ray.is_initialized():
            init_ray(None, namespace)
        self._check_resources(ray, num_workers, cpus_per_worker, gpus_per_worker)
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self.max_worker_restarts = max_worker_restarts
        self.namespace = namespace
        self.max_inflight_per_worker = max_inflight_per_worker
        self.name_prefix = name_prefix
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.ready_timeout_s = ready_timeout_s
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.on_long_tail: Callable[[list], None] | None = None
        self.on_chunk_done: Callable[["RayRolloutEngine", int, int], None] | None = None
        self.drafter = None
        self.total_restarts = 0  # over the engine's lifetime
        self.last_backend = "ray"
        self._options = {
            "eos_token_ids": self.eos_token_ids, "max_batch_size": int(max_batch_size), "gpus": gpus_per_worker,
            "num_threads": max(1, int(cpus_per_worker)), "worker_engine": worker_engine,
            "engine_kwargs": dict(engine_kwargs or {}),
        }
        self._spec = learner_spec(model)
        self._version = 0
        self._weights_ref = ray.put(pack_state(model.state_dict()))
        self._tokenizer_ref = ray.put(tokenizer)
        self._drafter_payload: tuple | None = None  # (config, state ref, version)
        self._lock = threading.RLock()
        self._workers: list[Any] = [None] * num_workers
        self._starting: dict[int, Any] = {}  # replacement workers still starting -> their info() ref
        self._closed = False
        try:
            for i in range(num_workers):
                self._workers[i] = self._spawn(i)
            self._wait_ready(list(range(num_workers)), ready_timeout_s)
        except BaseException:
            self.shutdown()  # no half-built pool left behind
            raise

    # -- setup ------------------------------------------------------------------------------

    @staticmethod
    def _check_resources(ray, num_workers: int, cpus: float, gpus: float) -> None:
        # what is free now: the learner actor (ray.learner_cpus/gpus) already holds its share
        free = ray.available_resources()
        have_cpu, have_gpu = float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0))
        if num_workers * cpus > have_cpu + 1e-9:
            raise ConfigError(
                f"ray.num_rollout_workers={num_workers} x ray.cpus_per_worker={cpus} needs {num_workers * cpus:g} CPUs "
                f"but the Ray cluster has {have_cpu:g} free (after the learner's ray.learner_cpus): lower one of "
                f"them or add nodes"
            )
        if num_workers * gpus > have_gpu + 1e-9:
            raise ConfigError(
                f"ray.num_rollout_workers={num_workers} x ray.gpus_per_worker={gpus} needs {num_workers * gpus:g} GPUs "
                f"but the Ray cluster has {have_gpu:g} free (after ray.learner_gpus): set ray.gpus_per_worker=0 "
                f"(CPU) or add GPU nodes"
            )

    def _name(self, index: int) -> str:
        return f"{self.name_prefix}-{index}"

    def _spawn(self, index: int, replacing: bool = False):
        """Start worker ``index`` (a new actor under its name) with the current weights. When
        ``replacing`` a dead worker, wait (up to 30 s) for Ray to release the dead actor's name."""
        cls = worker_actor_class()
        opts = dict(name=self._name(index), namespace=self.namespace, num_cpus=self.cpus_per_worker,
                    num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0)
        deadline = time.monotonic() + (30.0 if replacing else 0.0)
        while True:
            try:
                return cls.options(**opts).remote(index, self._spec, self._weights_ref, self._version,
                                                  self._tokenizer_ref, self._drafter_payload, self._options)
            except ValueError as err:  # the name is taken
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"cannot create the Ray actor {self._name(index)!r} in namespace {self.namespace!r}: {err}. "
                        "Another rlspec run on this cluster uses the namespace: set ray.namespace=... to a unique name"
                    ) from None
                time.sleep(0.1)

    def _replace(self, index: int) -> None:
        """Kill worker ``index`` (if it still runs) and start its replacement (current weights); it
        gets chunks once it has started (``self._starting`` holds its pending ``info()``)."""
        ray = import_ray()
        with contextlib.suppress(Exception):
            ray.kill(self._workers[index], no_restart=True)
        self._workers[index] = self._spawn(index, replacing=True)
        self._starting[index] = self._workers[index].info.remote()

    def _wait_ready(self, indices: list[int], timeout_s: float) -> None:
        ray = import_ray()
        refs = {self._workers[i].info.remote(): i for i in indices}
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if not_ready:
            raise TrainingError(
                f"{len(not_ready)} of {len(refs)} Ray rollout workers did not start within {timeout_s:.0f} s "
                f"(resources: ray.cpus_per_worker={self.cpus_per_worker}, ray.gpus_per_worker={self.gpus_per_worker}; "
                f"cluster: {ray.cluster_resources()})"
            )
        ray.get(ready)  # raises the construction error, if any

    # -- RolloutEngine ----------------------------------------------------------------------

    def set_drafter(self, drafter: Any) -> None:
        """Use ``drafter`` (an EagleDrafter of the learner model) on every worker from the next call
        (``None`` is not supported once a drafter was shipped; build a new engine instead)."""
        if drafter is None:
            if self._drafter_payload is not None:
                raise ConfigError("RayRolloutEngine.set_drafter(None) after a drafter was set is not supported")
            return
        with self._lock:
            self.drafter = drafter
            self._ship_drafter(force=True)

    def _ship_drafter(self, force: bool = False) -> bool:
        """Put the drafter's weights in the object store if its version changed; True if so."""
        if self.drafter is None:
            return False
        version = int(self.drafter.version)
        if not force and self._drafter_payload is not None and self._drafter_payload[2] == version:
            return False
        ray = import_ray()
        with self.drafter.lock:
            state = state_dict_cpu(self.drafter)
        self._drafter_payload = (self.drafter.config, ray.put(state), version)
        self._broadcast(weights=False)
        return True

    def update_weights(self) -> None:
        """Ship the learner's current weights (and the drafter's, when it changed) to every worker."""
        ray = import_ray()
        with self._lock:
            self._version += 1
            self._weights_ref = ray.put(pack_state(self.model.state_dict()))
            if self.drafter is not None and (self._drafter_payload is None
                                             or self._drafter_payload[2] != int(self.drafter.version)):
                with self.drafter.lock:
                    state = state_dict_cpu(self.drafter)
                self._drafter_payload = (self.drafter.config, ray.put(state), int(self.drafter.version))
            self._broadcast(weights=True)

    def _broadcast(self, weights: bool) -> None:
        ray = import_ray()
        restarts = 0
        # a replacement still starting is skipped: it syncs at its first chunk (generate_chunk)
        refs = {}
        for i in range(self.num_workers):
            if i in self._starting:
                continue
            if weights:
                refs[self._workers[i].load_weights.remote(self._weights_ref, self._version, self._drafter_payload)] = i
            else:
                refs[self._workers[i].load_drafter.remote(*self._drafter_payload)] = i
        for ref, i in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                restarts += 1
                self._count_restart(restarts, err, "update_weights")
                self._replace(i)  # built from the current weights: nothing to resend

    def _count_restart(self, restarts: int, err: BaseException, where: str) -> None:
        self.total_restarts += 1
        if restarts > self.max_worker_restarts:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingError(
                f"{restarts} Ray rollout workers died during one {where} call, more than "
                f"ray.max_worker_restarts={self.max_worker_restarts} (last: {type(err).__name__}: {first}); "
                "check the workers' logs (memory, node loss) or raise ray.max_worker_restarts"
            ) from err

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
                 return_hidden_states: bool = False) -> RolloutResult:
        """Sample one response per prompt on the pool; see the module docstring."""
        with self._lock:
            return self._generate(prompt_ids, params, return_hidden_states)

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return check_prompt_ids(prompt_ids, self.vocab_size)

    def _generate(self, prompt_ids, params: SamplingParams, want_hidden: bool) -> RolloutResult:
        if self._closed:
            raise TrainingError("RayRolloutEngine.generate after shutdown()")
        ray = import_ray()
        start = time.perf_counter()
        prompts = self._check_prompts(prompt_ids)
        if self.drafter is not None:
            self._ship_drafter()  # e.g. a resumed checkpoint restored the drafter
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        ranges = split_chunks(len(prompts), self.chunk_size)
        if params.streams is not None:  # every request takes its stream key to its worker, under the call's seed
            keys = stream_keys(params, len(prompts))
            chunk_params = [dataclasses.replace(params, seed=base, streams=tuple(keys[i] for i in r)) for r in ranges]
        else:
            chunk_params = [dataclasses.replace(params, seed=chunk_seed(base, k)) for k in range(len(ranges))]
        queue = deque(range(len(ranges)))
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (worker, chunk)
        load = [0] * self.num_workers
        results: list[RolloutResult | None] = [None] * len(ranges)
        busy = [0.0] * self.num_workers
        done_chunks = [0] * self.num_workers
        restarts = 0
        long_tail_sent = self.on_long_tail is None

        def submit() -> None:
            while queue:
                free = [i for i in range(self.num_workers)
                        if i not in self._starting and load[i] < self.max_inflight_per_worker]
                if not free:
                    return
                w = min(free, key=lambda i: (load[i], i))
                k = queue.popleft()
                ref = self._workers[w].generate_chunk.remote(
                    [prompts[i] for i in ranges[k]], chunk_params[k], want_hidden, self._version, [self._weights_ref],
                    self._drafter_payload)
                inflight[ref] = (w, k)
                load[w] += 1

        submit()
        while inflight or queue:
            # chunk results, and replacement workers finishing their start (they get work only then)
            done, _ = ray.wait(list(inflight) + list(self._starting.values()), num_returns=1,
                               timeout=None if inflight else self.ready_timeout_s)
            if not done:
                raise TrainingError(
                    f"no Ray rollout worker could be (re)started within {self.ready_timeout_s:.0f} s; the cluster "
                    f"has {ray.available_resources()} free for ray.cpus_per_worker={self.cpus_per_worker}, "
                    f"ray.gpus_per_worker={self.gpus_per_worker}"
                )
            ref = done[0]
            if ref not in inflight:
                w = next(i for i, r in self._starting.items() if r == ref)
                del self._starting[w]
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the replacement died while starting
                    restarts += 1
                    self._count_restart(restarts, err, "generate")
                    self._replace(w)
                submit()
                continue
            w, k = inflight.pop(ref)
            load[w] -= 1
            try:
                part = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                # worker w is gone: re-queue everything it held (front of the queue, in order), replace it
                lost = sorted([k] + [kk for ww, kk in inflight.values() if ww == w])
                for rr in [rr for rr, (ww, _) in inflight.items() if ww == w]:
                    del inflight[rr]
                load[w] = 0
                queue.extendleft(reversed(lost))
                restarts += 1
                self._count_restart(restarts, err, "generate")
                self._replace(w)
                submit()
                continue
            results[k] = part
            busy[w] += float(part.stats.get("seconds", 0.0))
            done_chunks[w] += 1
            if self.on_chunk_done is not None:
                self.on_chunk_done(self, w, k)
            submit()
            idle = any(load[i] == 0 and i not in self._starting for i in range(self.num_workers))
            if not long_tail_sent and not queue and inflight and idle:
                long_tail_sent = True  # the queue is empty and a worker idles: the pool's long tail
                finished = []
                if want_hidden:
                    for r in results:
                        if r is not None:
                            finished += [(list(p), list(resp), h) for p, resp, h in
                                         zip(r.prompt_ids, r.response_ids, r.response_hidden_states)]
                self.on_long_tail(finished)
        parts = [r for r in results if r is not None]
        assert len(parts) == len(ranges), "every chunk has a result"
        merged = merge_results(parts, want_hidden)
        seconds = time.perf_counter() - start
        stats = merge_stats([p.stats for p in parts])
        stats["seconds"] = seconds
        stats["tokens_per_s"] = stats["tokens"] / seconds if seconds > 0 else 0.0
        stats.update({
            "ray/workers": float(self.num_workers),
            "ray/chunks": float(len(ranges)),
            "ray/worker_restarts": float(restarts),
            "ray/worker_restarts_total": float(self.total_restarts),
            "ray/chunks_per_worker_max": float(max(done_chunks)),
            "ray/chunks_per_worker_min": float(min(done_chunks)),
            "ray/busy_seconds_max": max(busy),
            "ray/busy_seconds_min": min(busy),
            # busy time of all workers / (workers x wall time): 1.0 = no idle worker, no overhead
            "ray/utilization": sum(busy) / (self.num_workers * seconds) if seconds > 0 else 0.0,
        })
        merged.stats = stats
        return merged

    # -- lifecycle --------------------------------------------------------------------------

    def weights_ref(self) -> tuple[int, Any]:
        """``(version, ObjectRef)`` of the learner weights the workers hold (shared with other actors,
        e.g. :class:`~rlspec.rollout.speculative.remote_spot_trainer.RemoteSpotTrainer`, without another copy)."""
        return self._version, self._weights_ref

    @property
    def worker_names(self) -> list[str]:
        return [self._name(i) for i in range(self.num_workers)]

    def worker_info(self) -> list[dict[str, Any]]:
        """``info()`` of every worker (pid, device, weights version)."""
        ray = import_ray()
        return ray.get([w.info.remote() for w in self._workers])

    def shutdown(self) -> None:
        """Kill the worker actors (idempotent). Ray itself keeps running (see ``ray_runtime``)."""
        if self._closed:
            return
        self._closed = True
        try:
            ray = import_ray()
        except ConfigError:
            return
        if not ray.is_initialized():
            return
        for w in self._workers:
            if w is not None:
                with contextlib.suppress(Exception):
                    ray.kill(w, no_restart=True)
        self._workers = [None] * self.num_workers

    def __del__(self) -> None:  # best effort; the actors also die with their owner process
        with contextlib.suppress(Exception):
            self.shutdown()


def make_ray_engine(rc: RayConfig, rollout: RolloutConfig, model: torch.nn.Module, tokenizer: Any,
                    eos_token_ids: Sequence[int], **engine_kwargs: Any) -> RayRolloutEngine:
    """The rollout pool for ``runtime=ray``: ``ray.*`` for the pool, ``rollout.backend`` /
    ``max_batch_size`` for each worker's engine, ``engine_kwargs`` (e.g. ``speculative``) passed to
    it. Joins / starts Ray as ``ray.address`` says if it is not connected yet."""
    init_ray(rc.address, rc.namespace)
    return RayRolloutEngine(
        model, tokenizer, eos_token_ids, num_workers=rc.num_rollout_workers, chunk_size=rc.chunk_size,
        max_batch_size=rollout.max_batch_size, cpus_per_worker=rc.cpus_per_worker,
        gpus_per_worker=rc.gpus_per_worker, max_worker_restarts=rc.max_worker_restarts, namespace=rc.namespace,
        worker_engine=rollout.backend, engine_kwargs=engine_kwargs,
    )
