"""Per-step metrics: JSONL (always resumable), TensorBoard and W&B (optional), plots and a summary table."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional

from aapo_megatron.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors -> float, NaN/inf kept as strings JSON can carry."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": json.dumps would emit invalid JSON
    return value


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a kill is ignored)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLogger:
    """Writes one record per step. Only the writer rank writes; others are no-ops."""

    def __init__(self, run_dir: str, cfg: LoggingConfig, is_writer: bool = True, resume_step: Optional[int] = None,
                 run_config: Optional[dict] = None):
        self.run_dir = run_dir
        self.cfg = cfg
        self.is_writer = is_writer
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.history: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        if not is_writer:
            return
        os.makedirs(run_dir, exist_ok=True)
        # On resume, drop records after the checkpoint so the file reflects exactly one history.
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        if cfg.jsonl:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                for r in kept:
                    fh.write(json.dumps(r) + "\n")
            os.replace(tmp, self.path)
        self.history = kept
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=(resume_step + 1) if resume_step else None)
        if cfg.wandb_project:
            import wandb  # optional dependency

            self._wandb = wandb.init(project=cfg.wandb_project, config=run_config, resume="allow",
                                     dir=run_dir, name=os.path.basename(os.path.abspath(run_dir)))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` for `step` (scalars; tensors are converted)."""
        if not self.is_writer:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(record)
        if self.cfg.jsonl:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        """Flush and close the optional writers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def summary_table(history: list[dict[str, Any]], keys: Iterable[str]) -> str:
    """A fixed-width table of first / last / best (max) per key over the run."""
    rows = [("metric", "first", "last", "max")]
    for key in keys:
        values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        if values:
            rows.append((key, f"{values[0]:.4g}", f"{values[-1]:.4g}", f"{max(values):.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plots(run_dir: str, history: list[dict[str, Any]], keys: Iterable[str], filename: str = "curves.png") -> Optional[str]:
    """Plot each key against step into one PNG (one panel per key); returns the path or None if nothing to plot."""
    panels = [(k, [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]) for k in keys]
    panels = [(k, pts) for k, pts in panels if pts]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.4 * len(panels)), squeeze=False, sharex=True)
    for ax, (key, pts) in zip(axes[:, 0], panels):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(run_dir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
