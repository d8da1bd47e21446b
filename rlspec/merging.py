"""Post-hoc checkpoint merging: DLER's update-selective merge (arXiv 2510.15110, Sec. 4.6).

DLER recovers accuracy lost to length-penalty training by keeping only the largest weight
updates: ``delta = theta_tuned - theta_base``; keep the top 25% of the entries of ``delta`` by
magnitude (TIES-style trimming), scale them by 0.7 and add them to ``theta_base``. Naive
averaging or interpolation did not work in the paper. The released code has no merging script.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from rlspec.cli import parse_options, run_main
from rlspec.errors import ConfigError, ModelLoadError
from rlspec.schema import setting

__all__ = ["update_selective_merge", "top_k_mask", "merge_checkpoints"]


def _keep_count(top_k: float, n: int) -> int:
    """``ceil(top_k * n)`` entries, snapped to 1e-9 so that float noise (0.7 * 10 = 7.000000000000001)
    does not add one."""
    return min(n, math.ceil(round(top_k * n, 9)))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``magnitude`` (any shape), ties broken by flat index.

    Every entry strictly above the ``k``-th largest value is kept, then entries equal to it in
    increasing flat (row-major) index order until ``k`` are kept, so the result never depends
    on the sort algorithm.

    >>> top_k_mask(torch.tensor([2., 1., 2., 2.]), 2)
    tensor([ True, False,  True, False])
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0 or n == 0:
        return mask.reshape(magnitude.shape)
    if k >= n:
        return torch.ones_like(mask).reshape(magnitude.shape)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    mask |= flat > threshold
    need = k - int(mask.sum())
    ties = torch.nonzero(flat == threshold).flatten()[:need]  # nonzero returns indices in increasing order
    mask[ties] = True
    return mask.reshape(magnitude.shape)


def update_selective_merge(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    top_k: float = 0.25,
    scale: float = 0.7,
    per_tensor: bool = True,
) -> dict[str, torch.Tensor]:
    """DLER update-selective merging (arXiv 2510.15110, Sec. 4.6): ``base + scale * topk(tuned - base)``.

    ``delta = tuned - base``; the ``ceil(top_k * n)`` entries with the largest ``|delta|`` are
    kept, multiplied by ``scale`` and added to ``base``; the other entries stay at ``base``.
    Paper values: ``top_k=0.25``, ``scale=0.7``.

    The paper does not say whether the top-k is taken per tensor or over all parameters at once.
    ``per_tensor=True`` (default) keeps ``ceil(top_k * n)`` entries of every tensor, as TIES
    merging's per-tensor trimming does; ``per_tensor=False`` ranks all floating-point entries of
    the model together (keys in sorted order, then row-major), so tensors that moved more keep
    more entries. Global mode holds all ``|delta|`` values at once on the CPU (4 bytes per parameter).

    Ties at the threshold are broken deterministically: lower flat index first (in global mode,
    the earlier key in sorted order first). The delta is computed in float32 (float64 for
    float64 tensors), so bf16 checkpoints do not lose the small updates; the result has the
    promoted dtype of the two inputs (bf16 + bf16 -> bf16, bf16 + fp32 -> fp32).

    Non-floating tensors (integer or bool buffers) are not merged: they must be equal in both
    checkpoints and are copied from ``base``; if they differ a ``ValueError`` names the key.

    Args:
        base: state dict of the starting model (e.g. R1-Distill-Qwen-7B).
        tuned: state dict after RL (e.g. DLER-R1-7B); same keys and shapes as ``base``.
        top_k: fraction of entries to keep, in ``(0, 1]``.
        scale: multiplier of the kept entries (``1.0`` keeps the tuned values).
        per_tensor: rank entries within each tensor (True) or across the model (False).

    Returns:
        A new state dict (inputs are not modified).

    >>> out = update_selective_merge({"w": torch.zeros(4)}, {"w": torch.tensor([1., -4., 2., 3.])})
    >>> out["w"]  # k = ceil(.25 * 4) = 1: only -4 survives, scaled by .7
    tensor([ 0.0000, -2.8000,  0.0000,  0.0000])
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0 < top_k <= 1:
        raise ValueError(f"update_selective_merge: top_k must be a fraction in (0, 1] (DLER: 0.25), got {top_k!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"update_selective_merge: scale must be a finite number (DLER: 0.7), got {scale!r}")
    only_base = sorted(set(base) - set(tuned))
    only_tuned = sorted(set(tuned) - set(base))
    if only_base or only_tuned:
        raise ValueError(
            "update_selective_merge: the checkpoints have different keys "
            f"(only in base: {only_base[:5]}{' ...' if len(only_base) > 5 else ''}; "
            f"only in tuned: {only_tuned[:5]}{' ...' if len(only_tuned) > 5 else ''}); "
            "merge checkpoints of the same architecture, with the same key names"
        )

    merged: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}  # float keys only
    for key in sorted(base):
        b, t = base[key], tuned[key]
        if b.shape != t.shape:
            raise ValueError(
                f"update_selective_merge: {key!r} has shape {list(b.shape)} in base and {list(t.shape)} in tuned"
            )
        b_float, t_float = b.is_floating_point(), t.is_floating_point()
        if not (b_float and t_float):
            if b_float != t_float or b.dtype != t.dtype or not torch.equal(b, t.to(b.device)):
                raise ValueError(
                    f"update_selective_merge: non-floating tensor {key!r} ({b.dtype} / {t.dtype}) differs between "
                    "base and tuned; only floating-point weights can be merged, buffers must be identical"
                )
            merged[key] = b.clone()
            continue
        work = torch.float64 if torch.float64 in (b.dtype, t.dtype) else torch.float32
        delta = t.to(device=b.device, dtype=work) - b.to(work)  # same shape as the weight
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(f"update_selective_merge: {key!r} has a non-finite update (NaN/inf in base or tuned)")
        deltas[key] = delta

    if per_tensor:
        masks = {key: top_k_mask(d.abs(), _keep_count(top_k, d.numel())) for key, d in deltas.items()}
    else:
        keys = list(deltas)  # sorted
        work = torch.float64 if any(d.dtype == torch.float64 for d in deltas.values()) else torch.float32
        flat = torch.cat([deltas[k].abs().reshape(-1).to(device="cpu", dtype=work) for k in keys]) if keys else torch.zeros(0)
        mask_all = top_k_mask(flat, _keep_count(top_k, flat.numel()))
        masks, offset = {}, 0
        for key in keys:
            n = deltas[key].numel()
            masks[key] = mask_all[offset : offset + n].reshape(deltas[key].shape).to(deltas[key].device)
            offset += n

    for key, delta in deltas.items():
        b = base[key]
        out_dtype = torch.promote_types(b.dtype, tuned[key].dtype)
        merged[key] = (b.to(delta.dtype) + scale * delta * masks[key]).to(out_dtype)
    return {key: merged[key] for key in base}  # keep base's key order


# ---------------------------------------------------------------------------------- command line
def merge_checkpoints(base: str, tuned: str, out: str, top_k: float = 0.25, scale: float = 0.7,
                      per_tensor: bool = True) -> None:
    """Merge two HF causal-LM directories (same architecture) into ``out`` (tokenizer from
    ``tuned``, else ``base``).

    ``tuned`` may be a run's checkpoint (``runs/NAME/checkpoints/step_N``; its ``model/`` dir is
    used). Written atomically: a temporary directory renamed into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def resolve(path: str) -> Path:
        p = Path(path).expanduser()
        if (p / "model" / "config.json").is_file():
            p = p / "model"
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a save_pretrained model directory (no config.json); "
                                 f"give a model dir or a run checkpoint dir")
        return p

    base_dir, tuned_dir = resolve(base), resolve(tuned)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir)
    tuned_model = AutoModelForCausalLM.from_pretrained(tuned_dir)
    if type(base_model) is not type(tuned_model):
        raise ModelLoadError(f"cannot merge a {type(tuned_model).__name__} into a {type(base_model).__name__}")
    merged = update_selective_merge(base_model.state_dict(), tuned_model.state_dict(), top_k, scale, per_tensor)
    tuned_model.load_state_dict(merged)
    out_dir = Path(out).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tuned_model.save_pretrained(tmp)
        tok_dir = tuned_dir if (tuned_dir / "tokenizer_config.json").is_file() else base_dir
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class MergeCLIOptions:
    """``python -m rlspec.merging`` options."""

    base: Optional[str] = setting(None, "the base model dir (required)")
    tuned: Optional[str] = setting(None, "the tuned model dir or a run checkpoint dir (required)")
    out: Optional[str] = setting(None, "the merged model's dir (required)")
    top_k: float = setting(0.25, "fraction of each update kept, by magnitude (DLER: 0.25)")
    scale: float = setting(0.7, "scale of the kept update (DLER: 0.7)")
    per_tensor: bool = setting(True, "top-k per tensor, or over the whole model")

    def __post_init__(self) -> None:
        missing = [k for k in ("base", "tuned", "out") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"missing {', '.join(m + '=DIR' for m in missing)}; usage: {USAGE}")


USAGE = "python -m rlspec.merging base=DIR tuned=DIR out=DIR [top_k=0.25] [scale=0.7] [per_tensor=true]"


def _main(argv: list[str]) -> None:
    o = parse_options(MergeCLIOptions, argv, tool="rlspec.merging", usage=USAGE)
    merge_checkpoints(o.base, o.tuned, o.out, o.top_k, o.scale, o.per_tensor)
    print(f"merged model written to {o.out}")


def main(argv: list[str] | None = None) -> None:
    """``python -m rlspec.merging base=DIR tuned=DIR out=DIR [top_k=0.25] [scale=0.7] [per_tensor=true]``."""
    run_main(_main, argv, MergeCLIOptions, tool="rlspec.merging", usage=USAGE)


if __name__ == "__main__":
    main()
