"""Ray plumbing of the rollout pool: connecting to Ray, shipping weights, the worker actor.

* :func:`init_ray` starts a private local Ray instance (``ray.address`` unset) or joins a running
  cluster (``ray.address=auto`` on a cluster node, ``ray.address=ray://head:10001`` through Ray
  Client, or ``host:6379``);
* :func:`pack_state` / :func:`unpack_state` carry a state dict through Ray's object store as numpy
  arrays (shared zero-copy by the readers of a node);
* :class:`RolloutWorker` holds a private copy of the policy (:func:`build_model`) and an engine;
  :class:`~rlspec.rollout.ray_engine.RayRolloutEngine` runs it as an actor.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from rlspec.errors import ConfigError
from rlspec.rollout.base import RolloutResult, SamplingParams
from rlspec.rollout.engines import make_engine
from rlspec.rollout.speculative.eagle import EagleDrafter

RAY_INSTALL_HINT = 'pip install "rlspec[ray]"'


def import_ray():
    """``import ray`` with a clear error naming the extra when it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"runtime=ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


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

    Holds a private model copy and an engine (:func:`~rlspec.rollout.engines.make_engine`).
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


def worker_actor_class():
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
