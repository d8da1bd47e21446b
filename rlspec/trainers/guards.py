"""Training guards: a diverging run stops before it writes a wrecked checkpoint, and a run that
learns nothing says so (issue 20 point 4, issue 19 point 4).

* :class:`DivergenceGuard` -- after every policy update: the policy's weights are finite and one
  step did not change their norm by more than ``trainer.divergence.max_weight_change`` (AdamW
  moves every weight by about ``lr`` per step, so ``trainer.lr=1e6`` multiplies the norm of a
  small model by ~1e7 in one step, while a normal step changes it by ~1e-4: no other signal is as
  immediate; gradients and losses go wrong only a step later, when the rollouts of the wrecked
  model are already sampled); the pre-clip gradient norm stays under ``max_grad_norm`` and under
  ``grad_norm_spike`` times its running median. Each stop is one line naming the step,
  ``trainer.lr`` and ``trainer.grad_clip``.
* :func:`check_finite_state` -- before a checkpoint is written: the weights and the optimizer
  state are finite (a checkpoint that cannot be trained on is refused, not written).
* :class:`NoLearningGuard` -- ``trainer.no_learning.steps`` steps in a row without a policy update
  (no group kept, or every advantage zero) stop the run (or warn once) with the likely cause;
  ``train/skipped_updates`` is logged every step.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from rlspec.config import RLSpecConfig, TrainerConfig
from rlspec.errors import TrainingError

THINK_CLOSE = "</think>"


NORM_CHUNK = 1 << 22  # elements per float64 slice: at most 32 MiB extra on the accelerator


def weight_norm(module: torch.nn.Module) -> float:
    """The L2 norm of all of ``module``'s parameters in float64 (weights of 1e20 square to 1e40, past
    float32), a slice at a time: a 7B model's 4 GB embedding gets no float64 copy on the GPU."""
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(chunk, dtype=torch.float64)
                 for p in module.parameters() for chunk in p.detach().reshape(-1).split(NORM_CHUNK)]
        if not norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))  # one sync


def _fix(tc: TrainerConfig) -> str:
    return (f"lower trainer.lr (now {tc.lr:g}) or trainer.grad_clip (now {tc.grad_clip:g}) and start a new run "
            f"(run_name=...), or resume with trainer.divergence.enable=false if this update was sound")


class DivergenceGuard:
    """Checks each policy update (``trainer.divergence.*``); raises :class:`TrainingError`."""

    def __init__(self, tc: TrainerConfig) -> None:
        self.tc, self.dc = tc, tc.divergence
        self._grad_norms: deque[float] = deque(maxlen=100)  # recent non-zero pre-clip norms

    @contextmanager
    def watch(self, model: torch.nn.Module, metrics: dict[str, float], step: int,
              informative: bool = True) -> Iterator[None]:
        """Around one policy update (which fills ``metrics``, ``actor/grad_norm`` among them): an
        overflow inside the optimizer (``trainer.lr=1e38``: AdamW's step size is not a float32)
        or a diverged result stops the run before the engine samples from it. ``informative``:
        some advantage is non-zero (updates without are checked, but their tiny KL-only gradient
        norms do not enter the running median, which would make the next real update a "spike")."""
        before = weight_norm(model) if self.dc.enable else 0.0
        try:
            yield
        except RuntimeError as err:
            if "overflow" not in str(err):
                raise
            raise TrainingError(f"divergence at step {step}: the optimizer step overflowed ({str(err).strip()}); "
                                f"{_fix(self.tc)}") from None
        if self.dc.enable:
            self.after_update(model, before, metrics, step, informative)

    def after_update(self, model: torch.nn.Module, before: float, metrics: dict[str, float], step: int,
                     informative: bool = True) -> None:
        """``before``: the weight norm before the update; ``metrics``: the update's."""
        after = weight_norm(model)
        where = f"divergence at step {step}"
        tail = f"{_fix(self.tc)}; no checkpoint of this step was written"
        if not math.isfinite(after):
            raise TrainingError(f"{where}: the policy's weights are not finite after its update; {tail}")
        change = abs(after - before) / max(before, 1e-12)
        if change > self.dc.max_weight_change:
            raise TrainingError(
                f"{where}: one update changed the policy's weight norm from {before:.4g} to {after:.4g} "
                f"(x{after / max(before, 1e-12):.3g}; trainer.divergence.max_weight_change={self.dc.max_weight_change:g} "
                f"allows a {100 * self.dc.max_weight_change:g}% change); {tail}")
        grad = float(metrics.get("actor/grad_norm", 0.0))
        if self.dc.max_grad_norm is not None and grad > self.dc.max_grad_norm:
            raise TrainingError(f"{where}: the gradient norm before clipping is {grad:.4g} (trainer.divergence."
                                f"max_grad_norm={self.dc.max_grad_norm:g}); {tail}")
        if self.dc.grad_norm_spike and len(self._grad_norms) >= self.dc.spike_warmup:
            median = statistics.median(self._grad_norms)
            if grad > self.dc.grad_norm_spike * median:
                raise TrainingError(
                    f"{where}: the gradient norm before clipping is {grad:.4g}, {grad / median:.3g}x its running "
                    f"median {median:.4g} (trainer.divergence.grad_norm_spike={self.dc.grad_norm_spike:g}); {tail}")
        if informative and grad > 0 and math.isfinite(grad):
            self._grad_norms.append(grad)


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list state (an optimizer's ``state_dict``), with its path."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}[{i}]")


def check_finite_state(step: int, tc: TrainerConfig, parts: Sequence[tuple[str, torch.nn.Module, Any]]) -> None:
    """Refuse to checkpoint non-finite state: ``parts`` are ``(name, module, optimizer state)``
    (``None``: DeepSpeed's sharded optimizer state, which every rank writes itself and is not checked here). Raises :class:`TrainingError` naming the tensor."""
    for name, module, opt_state in parts:
        with torch.no_grad():
            bad = next((n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())), None)
            if bad is None and opt_state is not None:
                bad = next((f"optimizer state {n}" for n, t in _tensors(opt_state)
                            if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise TrainingError(f"refusing to write the checkpoint of step {step}: the {name}'s {bad} is not finite "
                                f"(the run diverged); {_fix(tc)}; the earlier checkpoints are intact")


@dataclass
class _Streak:
    """What the steps of the current no-learning streak sampled (for the likely cause)."""

    first_step: int = 0
    responses: int = 0
    correct: int = 0
    closed_think: int = 0
    varied_groups: int = 0  # groups whose rewards differ
    no_group_kept: int = 0  # steps that kept no group (the others: every advantage zero)


class NoLearningGuard:
    """``trainer.no_learning``: counts steps without a policy update and names the likely cause."""

    def __init__(self, cfg: RLSpecConfig) -> None:
        self.cfg, self.nc = cfg, cfg.trainer.no_learning
        self.streak = 0
        self.seen = _Streak()
        self.warned = False

    @staticmethod
    def advantages_zero(batch: Any) -> bool:
        """Whether no response of ``batch`` has a non-zero advantage (per token when it has them)."""
        rows = batch.token_advantages if getattr(batch, "token_advantages", None) is not None else [batch.advantages]
        return not any(bool((t.abs() > 0).any()) for t in rows)

    def observe(self, step: int, generated: Sequence[Any], kept: Sequence[Any], batch: Any,
                metrics: dict[str, float]) -> None:
        """After step ``step``'s update: log ``train/skipped_updates`` (1: no policy update) and
        stop or warn when the streak reaches ``trainer.no_learning.steps``."""
        skipped = not kept or batch is None or self.advantages_zero(batch)
        metrics["train/skipped_updates"] = float(skipped)
        if not skipped:
            self.streak, self.seen = 0, _Streak()
            return
        if self.streak == 0:
            self.seen.first_step = step
        self.streak += 1
        s = self.seen
        s.no_group_kept += int(not kept)
        fg = self.cfg.trainer.filter_groups
        by_acc = fg.enable and fg.metric == "acc"  # what dynamic sampling compares within a group
        for group in generated:
            s.responses += len(group.texts)
            s.correct += sum(bool(c) for c in group.correct)
            s.closed_think += sum(THINK_CLOSE in t for t in group.texts)
            values = [float(c) for c in group.correct] if by_acc else list(group.rewards)
            s.varied_groups += int(max(values) != min(values))
        if not self.nc.steps or self.streak < self.nc.steps or self.warned:
            return
        what = "no group was kept" if s.no_group_kept == self.streak else "every advantage was zero"
        msg = (f"no learning for {self.streak} steps in a row (steps {s.first_step}-{step}: {what}); likely cause: "
               f"{self.likely_cause()}")
        if self.nc.action == "error":
            raise TrainingError(f"{msg}; or set trainer.no_learning.action=warn to train on regardless")
        self.warned = True
        warnings.warn(f"{msg} (said once; train/skipped_updates logs every step)", stacklevel=2)

    def likely_cause(self) -> str:
        s, cfg = self.seen, self.cfg
        acc = s.correct / max(s.responses, 1)
        if s.responses and s.correct == s.responses:
            return ("every response was correct (100% accuracy), so all rewards are equal: the prompts are too easy "
                    "for this model; use harder data (data.path)")
        if s.correct == 0 and cfg.reward.require_think_close and s.closed_think == 0:
            return (f"no response closed {THINK_CLOSE} and reward.require_think_close=true grades those incorrect "
                    f"(0% accuracy): for a model that does not think in tags set reward.require_think_close=false")
        if s.correct == 0:
            return ("every response was graded incorrect (0% accuracy): the task is too "
                    "hard for the model, or the grader cannot match its answers to the gold ones (a grader "
                    "mismatch: check data.answer_key and that the model ends with \\boxed{answer}, or set "
                    "reward.last_number_fallback=true for a model that does not box its answers; see "
                    "completions.jsonl, trainer.log_completions_every)")
        if s.varied_groups == 0:
            return (f"the responses to each prompt all got the same reward or correctness (accuracy {100 * acc:.0f}%, terms "
                    f"{', '.join(cfg.reward.terms) or 'custom'}): more varied responses (rollout.n={cfg.rollout.n}, "
                    f"rollout.temperature={cfg.rollout.temperature:g}) or a reward that tells them apart")
        return (f"rewards differ within some groups but trainer.adv_estimator={cfg.trainer.adv_estimator} gave every "
                f"response a zero advantage; check the estimator's settings")
