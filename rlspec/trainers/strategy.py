"""Training strategies: who owns the optimizer, how gradients are reduced, what a checkpoint holds.

The trainer's loop (:mod:`rlspec.trainers.grpo`) is the same for every strategy; it asks the
strategy for the module to run training forwards through, hands it each micro-batch loss, and
asks it to take the optimizer step:

* :class:`LocalStrategy` -- one process, ``torch.optim.AdamW``, ``clip_grad_norm_``.
* :class:`DeepSpeedStrategy` -- ZeRO stage 0-3 data parallelism (``trainer.strategy=deepspeed``)
  over the processes of a ``torchrun`` / ``deepspeed`` launch, gloo on CPU and NCCL on GPUs.
  Every rank holds the same training batch (rollouts are sharded over the ranks and gathered,
  see :class:`DataParallelEngine`); each optimizer step's micro-batches are dealt round-robin
  to the ranks, so the summed gradient equals the single-process one (DeepSpeed averages over
  ranks, hence the ``world_size`` loss scale). Ranks run the same number of forwards and
  backwards (a rank short of a micro-batch runs a zero-weighted one): ZeRO-2 reduces at every
  backward and ZeRO-3 gathers parameters at every forward, collectively.

The *policy* the rollout engine samples from and the checkpoints save is ``strategy.policy``: the
trained module itself, except under ZeRO-3 where the trained module's parameters are partitioned
over the ranks, so a full copy is kept and refreshed after each optimizer step
(:meth:`DeepSpeedStrategy.sync_policy`; gathered one tensor group at a time).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import socket
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from rlspec.data import derive_seed
from rlspec.errors import ConfigError, TrainingError
from rlspec.rollout.base import merge_stats, stream_keys


def _adamw(params: Sequence[torch.nn.Parameter], tc: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)


def _nonfinite_grad(step: int) -> TrainingError:
    return TrainingError(
        f"non-finite gradient norm at step {step}; lower trainer.lr or trainer.grad_clip; "
        f"the run resumes from the last checkpoint with trainer.resume=auto"
    )


class LocalStrategy:
    """One process: the module is trained in place by ``torch.optim.AdamW``."""

    name = "local"
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, model: torch.nn.Module, tc: Any) -> None:
        self.policy = model
        self.train_module = model
        self.optimizer = _adamw([p for p in model.parameters() if p.requires_grad], tc)

    # -- one optimizer step ---------------------------------------------------------------
    def deal(self, micros: list[list[int]]) -> list[tuple[list[int], bool]]:
        """This rank's share of a step's micro-batches as ``(rows, counted)`` pairs."""
        return [(m, True) for m in micros]

    @property
    def loss_scale(self) -> float:
        return 1.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()

    def step(self, grad_clip: float, step: int) -> float:
        """Clip, then step (a non-finite norm raises before the weights change)."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.train_module.parameters(), grad_clip))
        if not math.isfinite(norm):
            raise _nonfinite_grad(step)
        self.optimizer.step()
        return norm

    def sync_policy(self) -> None:
        """The policy *is* the trained module here."""

    # -- collectives (identity in one process) ---------------------------------------------
    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def all_reduce_max(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""

    # -- checkpoints ------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, Any] | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any] | None, checkpoint: Path) -> None:
        if state is None:
            raise TrainingError(
                f"{checkpoint} holds no single-process optimizer state (it was written with "
                f"trainer.strategy=deepspeed); resume it with trainer.strategy=deepspeed"
            )
        self.optimizer.load_state_dict(state)

    def save_sharded(self, directory: Path) -> None:
        """No per-rank state beyond ``trainer_state.pt``."""

    def load_sharded(self, checkpoint: Path, subdir: str = "deepspeed") -> None:
        """No per-rank state beyond ``trainer_state.pt``."""

    def close(self) -> None:
        """Nothing to release."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deepspeed_config(tc: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``trainer.deepspeed`` (``trainer.deepspeed.config`` merged last).

    Gradient accumulation is driven by the trainer (token-budgeted micro-batches of varying
    count), so DeepSpeed sees one micro-batch per step and the boundary is set explicitly.
    """
    ds = tc.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # no persistent (never partitioned) small parameters and no prefetching: every rank runs the same
        # forwards in lockstep, so gathers happen exactly where each module runs
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # the client optimizer is torch AdamW (the local strategy's), also when ZeRO offloads its states
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    _merge(config, dict(ds.config))
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def init_process_group(backend: str) -> tuple[int, int]:
    """Join (or create) the default process group: a ``torchrun`` launch provides RANK /
    WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain ``python -m rlspec.train`` is a world of one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise ConfigError("trainer.strategy=deepspeed with WORLD_SIZE>1 needs MASTER_PORT: launch with "
                              "torchrun --nproc_per_node N -m rlspec.train ... (or the deepspeed launcher)")
        os.environ["MASTER_PORT"] = str(_free_port())
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size()


class DeepSpeedStrategy:
    """ZeRO data parallelism with DeepSpeed (``trainer.strategy=deepspeed``).

    The optimizer is the same ``torch.optim.AdamW`` as the local strategy, handed to DeepSpeed as
    a client optimizer (ZeRO partitions its states), so a run's updates do not depend on the
    strategy beyond reduction order. Checkpoints keep the gathered HF weights (what export and
    eval read) plus DeepSpeed's own sharded states under ``deepspeed/`` (optimizer partitions),
    written by every rank into the same atomic checkpoint directory.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, tc: Any) -> None:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError('trainer.strategy=deepspeed needs DeepSpeed: pip install "rlspec[deepspeed]" '
                              "(on CPU: DS_BUILD_OPS=0 pip install deepspeed)") from None
        self.rank, self.world_size = init_process_group(tc.deepspeed.backend)
        self.is_main = self.rank == 0
        self.zero_stage = tc.deepspeed.zero_stage
        # ZeRO-3 partitions the trained module's parameters: the rollout engine, evaluation and
        # checkpoints read a full copy, refreshed after every optimizer step
        self.policy = copy.deepcopy(model).eval() if self.zero_stage == 3 else model
        self.optimizer = _adamw([p for p in model.parameters() if p.requires_grad], tc)
        self.config = deepspeed_config(tc, self.world_size)
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.train_module = self.engine
        self._boundary = getattr(self.engine, "set_gradient_accumulation_boundary")

    # -- one optimizer step ---------------------------------------------------------------
    def deal(self, micros: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Round-robin micro-batches over the ranks; ranks left short repeat micro-batch 0 with
        its loss weighted 0 (``counted=False``) so every rank runs as many forwards/backwards."""
        rounds = -(-len(micros) // self.world_size)
        mine: list[tuple[list[int], bool]] = []
        for r in range(rounds):
            k = r * self.world_size + self.rank
            mine.append((micros[k], True) if k < len(micros) else (micros[0], False))
        return mine

    @property
    def loss_scale(self) -> float:
        # DeepSpeed averages gradients over ranks; every rank's loss is already normalised by the
        # whole optimizer step's token count, so the wanted gradient is the *sum* over ranks
        return float(self.world_size)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self._boundary(last)
        self.engine.backward(loss)

    def step(self, grad_clip: float, step: int) -> float:
        """DeepSpeed clips (``gradient_clipping``) and steps; the norm is the global one. Stage 0
        (plain data parallel: gradients are all-reduced in backward) has no ZeRO optimizer to report
        a norm, so it is taken here, before the step, like the local strategy."""
        self._boundary(True)
        if self.zero_stage == 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), grad_clip))
            if not math.isfinite(norm):
                raise _nonfinite_grad(step)
            self.engine.step()
            return norm
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = float(reported) if reported is not None else float("nan")
        if not math.isfinite(norm):
            raise _nonfinite_grad(step)
        return norm

    def sync_policy(self) -> None:
        """ZeRO-3: gather the trained parameters into the full policy copy (collective)."""
        if self.zero_stage != 3:
            return
        import deepspeed

        src = dict(self.engine.module.named_parameters())
        dst = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, param in src.items():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    dst[name].copy_(param.data.view_as(dst[name]))

    # -- collectives -----------------------------------------------------------------------
    def _reduce(self, values: dict[str, float], op: Any) -> dict[str, float]:
        keys = sorted(values)
        merged = self.all_gather_object(keys)  # ranks may differ in which keys they saw
        keys = sorted({k for ks in merged for k in ks})
        fill = 0.0 if op == dist.ReduceOp.SUM else -math.inf
        t = torch.tensor([values.get(k, fill) for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return dict(zip(keys, t.tolist()))

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: dict[str, float]) -> dict[str, float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    # -- checkpoints ------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, Any] | None:
        return None  # sharded: under deepspeed/ (save_sharded)

    def load_optimizer_state(self, state: dict[str, Any] | None, checkpoint: Path) -> None:
        if state is not None:
            raise TrainingError(
                f"{checkpoint} was written by the single-process trainer (trainer.strategy=local); resume it "
                f"with trainer.strategy=local, or start a new run (run_name=...)"
            )

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its optimizer partition (collective)."""
        self.engine.save_checkpoint(str(directory), tag="state", save_latest=False)

    def load_sharded(self, checkpoint: Path, subdir: str = "deepspeed") -> None:
        path = checkpoint / subdir
        if not (path / "state").is_dir():
            raise TrainingError(f"{checkpoint} has no {subdir}/state directory: it was not written with "
                                f"trainer.strategy=deepspeed; resume with the strategy that wrote it")
        loaded, _ = self.engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise TrainingError(f"DeepSpeed could not load {path}/state (written with a different world size "
                                f"or ZeRO stage?); resume with the launch that wrote it")
        self.sync_policy()

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def make_strategy(model: torch.nn.Module, tc: Any) -> LocalStrategy | DeepSpeedStrategy:
    """The strategy named by ``trainer.strategy``."""
    if tc.strategy == "deepspeed":
        return DeepSpeedStrategy(model, tc)
    return LocalStrategy(model, tc)


class DataParallelEngine:
    """Shards each ``generate`` call over the ranks and gathers the results on every rank.

    Rank ``r`` samples a contiguous slice of the prompts with its own seed (derived from the
    call's seed and ``r``) -- or, when the call gives ``SamplingParams.streams``, with the call's
    seed and its prompts' stream keys (a row then samples as on one rank) -- so the ranks' rollouts
    are independent; every rank then holds the whole
    result, in input order, and scores it identically (stateful reward terms such as HAPO's history
    stay the same on every rank).
    """

    def __init__(self, engine: Any, strategy: Any) -> None:
        self.inner = engine
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:  # drafter, on_long_tail, set_drafter, eos_token_ids, ...
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "strategy"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def update_weights(self) -> None:
        self.inner.update_weights()

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Any, **kwargs: Any) -> Any:
        world, rank = self.strategy.world_size, self.strategy.rank
        n = len(prompt_ids)
        bounds = [n * r // world for r in range(world + 1)]
        mine = list(prompt_ids[bounds[rank] : bounds[rank + 1]])
        if getattr(params, "streams", None) is not None:  # keyed rows: the call's seed, this slice's keys
            keys = stream_keys(params, n)
            mine_params = dataclasses.replace(params, streams=tuple(keys[bounds[rank] : bounds[rank + 1]]))
        else:
            seed = None if params.seed is None else derive_seed(params.seed, rank, 7)
            mine_params = dataclasses.replace(params, seed=seed)
        local = self.inner.generate(mine, mine_params, **kwargs) if mine else None
        parts = self.strategy.all_gather_object(local)
        parts = [p for p in parts if p is not None]
        if not parts:  # no prompts at all
            return self.inner.generate([], params, **kwargs)
        merged: dict[str, Any] = {}
        for f in dataclasses.fields(parts[0]):
            if f.name == "stats":
                continue
            merged[f.name] = [x for p in parts for x in getattr(p, f.name)]
        stats = merge_rollout_stats([p.stats for p in parts])
        return type(parts[0])(**merged, stats=stats)


def merge_rollout_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the stats of rollout calls that ran concurrently (ranks): counts add and ``spec/*``
    rates are weighted by speculative steps exactly as for Ray's chunks
    (:func:`rlspec.rollout.base.merge_stats`); the call took as long as the slowest part."""
    out = merge_stats(parts)
    out["seconds"] = max((float(p.get("seconds", 0.0)) for p in parts), default=0.0)
    out["tokens_per_s"] = out["tokens"] / out["seconds"] if out["seconds"] > 0 else 0.0
    return out
