"""Metrics logging: console (rich), ``metrics.jsonl`` per run, wandb (offline without a key), plots.

Logging never crashes a run: a backend that fails to start is dropped with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# the metrics shown on the console line and the progress bar, in this order
CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("acc/mean", "acc"),
    ("response_length/mean", "len"),
    ("response_length/clip_ratio", "trunc"),
    ("actor/entropy", "ent"),
    ("actor/grad_norm", "gnorm"),
    ("perf/tokens_per_s", "tok/s"),
    ("timing_s/step", "s/step"),
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        backends: list[str],
        *,
        project: str = "rlspec",
        run_name: str = "run",
        wandb_mode: str = "auto",
        wandb_entity: str | None = None,
        config: dict[str, Any] | None = None,
        progress: str = "auto",
        total_steps: int = 0,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.backends = list(backends)
        self.console = Console(stderr=False, highlight=False)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        if "wandb" in self.backends:
            self._wandb = self._start_wandb(project, run_name, wandb_mode, wandb_entity, config)
        show_bar = progress == "on" or (progress == "auto" and sys.stdout.isatty())
        self._progress: Progress | None = None
        if show_bar and total_steps:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[summary]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, summary="")
            self._progress.start()

    def _start_wandb(self, project, run_name, mode, entity, config):
        try:
            import wandb
        except ImportError:
            warnings.warn("logger: wandb is not installed; logging to console/jsonl only", stacklevel=2)
            return None
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
            mode = "online" if has_key else "offline"
        if mode == "disabled":
            return None
        try:
            return wandb.init(
                project=project, name=run_name, entity=entity, mode=mode, config=config, dir=str(self.run_dir),
                resume="allow", id=f"{run_name}-{hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:8]}",
            )
        except Exception as err:  # noqa: BLE001 - logging must never crash the run
            warnings.warn(f"logger: wandb failed to start ({err}); continuing without it", stacklevel=2)
            return None

    def print(self, *args: Any, **kwargs: Any) -> None:
        if "console" in self.backends:
            if self._progress is not None:
                self._progress.console.print(*args, **kwargs)
            else:
                self.console.print(*args, **kwargs)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        if "jsonl" in self.backends:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"logger: wandb.log failed ({err}); disabling wandb", stacklevel=2)
                self._wandb = None
        summary = "  ".join(f"{short}={_fmt(metrics[k])}" for k, short in CONSOLE_KEYS if k in metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=summary)
        if "console" in self.backends and summary:
            self.print(f"step {step}: {summary}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self._wandb = None


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records logged after ``max_step`` (a resumed run re-logs those steps)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= max_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """PNG of accuracy and mean response length over steps (training rollouts and evals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    train = [r for r in records if "acc/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    if not train and not evals:
        return None
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_acc.plot(steps, [r["acc/mean"] for r in train], label="train rollouts", alpha=0.7)
        ax_len.plot(steps, [r["response_length/mean"] for r in train], label="train rollouts", alpha=0.7)
    if evals:
        steps = [r["step"] for r in evals]
        ax_acc.plot(steps, [r["eval/accuracy"] for r in evals], "o-", label="held-out eval")
        ax_len.plot(steps, [r["eval/mean_tokens"] for r in evals], "o-", label="held-out eval")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_len.set_xlabel("step")
    ax_len.set_ylabel("mean response tokens")
    for ax in (ax_acc, ax_len):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
