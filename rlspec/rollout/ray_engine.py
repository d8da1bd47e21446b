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
import hashlib
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch

from rlspec.errors import ConfigError, TrainingError
from rlspec.rollout.base import RolloutResult, SamplingParams, check_prompt_ids

WORKER_NAME = "rlspec-rollout"
RAY_INSTALL_HINT = 'pip install "rlspec[ray]"'


def import_ray():
    """``import ray`` with a clear error naming the extra when it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"runtime=ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


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


def state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached, contiguous CPU tensors (what is shipped to workers)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


_PACKED = "__rlspec_packed_state__"
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A state dict as numpy arrays (what Ray's object store shares zero-copy with every reader on
    a node; pickled torch tensors would be copied per reader). Dtypes numpy lacks (bfloat16, float8)
    travel as same-size integers and are viewed back by :func:`unpack_state`."""
    arrays, dtypes = {}, {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        try:
            arrays[name] = t.numpy()
        except TypeError:
            arrays[name] = t.view(_SAME_SIZE_INT[t.element_size()]).numpy()
        dtypes[name] = t.dtype
    return {_PACKED: True, "arrays": arrays, "dtypes": dtypes}


def unpack_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state` (a plain state dict is returned as is). The tensors view the
    (read-only) object-store memory: load them with ``load_state_dict``, which copies."""
    if not obj.get(_PACKED):
        return obj
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        for name, arr in obj["arrays"].items():
            t = torch.from_numpy(arr)
            dtype = obj["dtypes"][name]
            out[name] = t if t.dtype == dtype else t.view(dtype)
    return out


def merge_results(parts: Sequence[RolloutResult], want_hidden: bool) -> RolloutResult:
    """Concatenate per-chunk results (in chunk order) into one result; stats are not merged here."""
    kw: dict[str, Any] = dict(prompt_ids=[], response_ids=[], response_logprobs=[], finish_reasons=[], stats={})
    hidden: list[torch.Tensor] = []
    for part in parts:
        kw["prompt_ids"] += part.prompt_ids
        kw["response_ids"] += part.response_ids
        kw["response_logprobs"] += part.response_logprobs
        kw["finish_reasons"] += part.finish_reasons
        if want_hidden:
            hidden += part.response_hidden_states
    if not want_hidden:
        return RolloutResult(**kw)
    from rlspec.rollout.native import RolloutResultWithHidden

    return RolloutResultWithHidden(**kw, response_hidden_states=hidden)


_SUMMED = ("tokens", "prompt_tokens", "decode_steps", "spec/sd_steps", "spec/switch_seconds", "spec/reentered")


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-chunk engine stats -> one dict: counts summed, ``spec/*`` rates averaged with the chunks'
    speculative steps as weights (``spec/frac_steps_sd`` = SD steps / decode steps), ``spec/arm/*``
    summed, ``spec/reverted`` = max. ``seconds`` / ``tokens_per_s`` are set by the caller (wall time)."""
    out: dict[str, float] = {k: 0.0 for k in ("tokens", "prompt_tokens", "decode_steps")}
    keys = {k for p in parts for k in p}
    for key in keys:
        vals = [float(p.get(key, 0.0)) for p in parts]
        if key in _SUMMED or key.startswith("spec/arm/"):
            out[key] = sum(vals)
        elif key == "spec/reverted":
            out[key] = max(vals)
        elif key.startswith("spec/") and key != "spec/frac_steps_sd":
            weights = [float(p.get("spec/sd_steps", 0.0)) for p in parts]
            total = sum(weights)
            out[key] = sum(w * v for w, v in zip(weights, vals)) / total if total else 0.0
    if "spec/sd_steps" in out:
        out["spec/frac_steps_sd"] = out["spec/sd_steps"] / out["decode_steps"] if out["decode_steps"] else 0.0
    return out


# ---------------------------------------------------------------------------------- the worker


def _empty_init():
    """Build a model without running its (expensive, overwritten anyway) weight initialisation."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def learner_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What a worker needs to rebuild the learner's model besides its state dict: the class, the
    config, the dtype, and the buffers that are not in the state dict (e.g. RoPE's float32
    ``inv_freq``, which a dtype cast would round: the learner keeps it in float32)."""
    param = next(model.parameters())
    persistent = set(model.state_dict())
    buffers = {k: v.detach().to("cpu").clone() for k, v in model.named_buffers() if k not in persistent}
    return {"cls": type(model), "config": model.config, "dtype": param.dtype, "buffers": buffers}


def build_model(spec: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> torch.nn.Module:
    """A copy of the learner's model: ``spec["cls"](spec["config"])``, cast to ``spec["dtype"]``,
    moved to ``device``, loaded with ``state`` (a state dict or :func:`pack_state`'s form) and the
    learner's non-persistent buffers (``spec["buffers"]``, in their own dtypes)."""
    with _empty_init():
        try:
            model = spec["cls"](spec["config"])
        except Exception as err:  # e.g. a remote-code class that is not importable on this node
            raise ConfigError(
                f"a rollout worker cannot build {getattr(spec['cls'], '__name__', spec['cls'])} "
                f"({type(err).__name__}: {err}); install the model's code on every Ray node"
            ) from err
    model = model.to(dtype=spec["dtype"], device=device).eval()
    model.load_state_dict(unpack_state(state))
    buffers = dict(model.named_buffers())
    for name, value in (spec.get("buffers") or {}).items():
        if name in buffers:
            buffers[name].data = value.to(device)
    model.requires_grad_(False)
    return model


class RolloutWorker:
    """One rollout worker (run as a Ray actor by :class:`RayRolloutEngine`; plain Python here).

    Holds a private model copy and an engine (``rlspec.rollout.make_engine(worker_engine, ...)``).
    ``generate_chunk`` first brings the weights to the version the driver sends with the chunk.
    """

    def __init__(self, index: int, spec: dict[str, Any], state: dict[str, torch.Tensor], version: int,
                 tokenizer: Any, drafter: tuple | None, options: dict[str, Any]) -> None:
        threads = max(1, int(options.get("num_threads") or 1))
        torch.set_num_threads(threads)
        use_cuda = options.get("gpus", 0) > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        self.index = index
        self.model = build_model(spec, state, self.device)
        self.version = version
        from rlspec.rollout import make_engine

        self.engine = make_engine(options.get("worker_engine", "native"), self.model, tokenizer,
                                  eos_token_ids=list(options["eos_token_ids"]),
                                  max_batch_size=int(options["max_batch_size"]),
                                  **dict(options.get("engine_kwargs") or {}))
        self.drafter = None
        self.drafter_version = -1
        if drafter is not None:
            self.load_drafter(*drafter)
        self.chunks_done = 0
        self.busy = False

    def info(self) -> dict[str, Any]:
        """Where the worker runs (also: the actor finished building)."""
        return {"index": self.index, "pid": os.getpid(), "device": self.device, "version": self.version,
                "drafter_version": self.drafter_version, "threads": torch.get_num_threads()}

    def drafter_state(self) -> dict[str, torch.Tensor] | None:
        """The worker's drafter weights (CPU copies), ``None`` without a drafter."""
        if self.drafter is None:
            return None
        with self.drafter.lock:
            return state_dict_cpu(self.drafter)

    def progress(self) -> dict[str, Any]:
        """Counters an operator (or a test) can poll while a chunk is being generated."""
        return {"index": self.index, "pid": os.getpid(), "version": self.version, "busy": self.busy,
                "chunks_done": self.chunks_done}

    def load_weights(self, state: dict[str, torch.Tensor], version: int, drafter: tuple | None = None) -> int:
        """Copy the learner's weights in (and the drafter's when given); returns the new version."""
        with torch.no_grad():
            self.model.load_state_dict(unpack_state(state))
        self.engine.update_weights()
        self.version = int(version)
        if drafter is not None:
            self.load_drafter(*drafter)
        return self.version

    def load_drafter(self, config: Any, state: dict[str, torch.Tensor], version: int) -> None:
        from rlspec.rollout.drafter import EagleDrafter

        if not isinstance(state, dict):  # an ObjectRef nested in an argument is not resolved by Ray
            state = import_ray().get(state)
        if self.drafter is None:
            self.drafter = EagleDrafter(config, self.model, seed=None)
            self.drafter.load_state_dict(state)
            self.drafter.version = int(version)
            self.engine.set_drafter(self.drafter)
        else:
            with self.drafter.lock, torch.no_grad():
                self.drafter.load_state_dict(state)
                self.drafter.version = int(version)
        self.drafter_version = int(version)

    def generate_chunk(self, prompts: list[list[int]], params: SamplingParams, want_hidden: bool,
                       version: int, weights: list, drafter: tuple | None) -> RolloutResult:
        """Sample a chunk with the learner's weights ``version``: a worker that is behind (a
        replacement started before the last ``update_weights``) first loads ``weights[0]`` (the
        object-store copy, passed inside a list so Ray does not fetch it unless needed) and the
        drafter ``(config, state, version)`` when its version differs."""
        if version != self.version:
            self.load_weights(import_ray().get(weights[0]), version)
        if drafter is not None and int(drafter[2]) != self.drafter_version:
            self.load_drafter(*drafter)
        self.busy = True
        try:
            kw = {"return_hidden_states": True} if want_hidden else {}
            result = self.engine.generate(prompts, params, **kw)
        finally:
            self.busy = False
        if want_hidden:
            result.response_hidden_states = [h.detach().to("cpu") for h in result.response_hidden_states]
        result.response_logprobs = [lp.to("cpu") for lp in result.response_logprobs]
        self.chunks_done += 1
        return result


_ACTOR_CLASS = None


def _worker_actor_class():
    """``RolloutWorker`` as a Ray actor class; ``progress`` runs in its own concurrency group so it
    answers while a chunk is being generated (chunks themselves run one at a time)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        ray = import_ray()

        class _Worker(RolloutWorker):
            @ray.method(concurrency_group="status")
            def progress(self) -> dict[str, Any]:
                return RolloutWorker.progress(self)

        _Worker.__name__ = _Worker.__qualname__ = "RolloutWorker"
        _ACTOR_CLASS = ray.remote(concurrency_groups={"status": 1})(_Worker)
    return _ACTOR_CLASS


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
        worker_engine: the engine each worker builds (a name of :data:`rlspec.rollout.ENGINES`).
        engine_kwargs: extra keyword arguments for that engine (e.g. ``speculative=...``).
        max_inflight_per_worker: chunks queued on a worker at once (1: best long-tail balance).
        name_prefix: actor names are ``f"{name_prefix}-{i}"``.
        ready_timeout_s: how long to wait for the workers to start before failing.

    Needs a connected Ray (:func:`rlspec.ray_runtime.init_ray`); it is initialised locally if not.
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
            from rlspec.ray_runtime import init_ray

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
        cls = _worker_actor_class()
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
        chunk_params = [SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                       top_p=params.top_p, top_k=params.top_k, stop_strings=tuple(params.stop_strings),
                                       seed=chunk_seed(base, k)) for k in range(len(ranges))]
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
        e.g. :class:`rlspec.ray_runtime.RemoteSpotTrainer`, without another copy)."""
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


def make_ray_engine(cfg: Any, model: torch.nn.Module, tokenizer: Any, eos_token_ids: Sequence[int],
                    speculative: Any = None, **engine_kwargs: Any) -> RayRolloutEngine:
    """The rollout pool for ``runtime=ray`` from a validated :class:`rlspec.config.RLSpecConfig`:
    ``cfg.ray.*`` for the pool, ``cfg.rollout.backend`` / ``max_batch_size`` for each worker's engine
    and ``speculative`` (a ``SpeculativeSettings``) for TLT decoding on the workers. Joins / starts
    Ray as ``cfg.ray.address`` says if it is not connected yet."""
    from rlspec.ray_runtime import init_ray

    rc = cfg.ray
    init_ray(rc.address, rc.namespace)
    kwargs = dict(engine_kwargs)
    if speculative is not None:
        kwargs["speculative"] = speculative
    return RayRolloutEngine(
        model, tokenizer, eos_token_ids, num_workers=rc.num_rollout_workers, chunk_size=rc.chunk_size,
        max_batch_size=cfg.rollout.max_batch_size, cpus_per_worker=rc.cpus_per_worker,
        gpus_per_worker=rc.gpus_per_worker, max_worker_restarts=rc.max_worker_restarts, namespace=rc.namespace,
        worker_engine=cfg.rollout.backend, engine_kwargs=kwargs,
    )
