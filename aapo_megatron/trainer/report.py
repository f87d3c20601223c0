"""What the loop shows: named phase timers, the per-step progress line, and the end-of-run summary.

    with phase_timer("train", m):       # m["time/train"] += the phase's wall time, seconds
        ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator, Optional

from aapo_megatron.trainer.metrics import summary_table, write_plots

log = logging.getLogger("aapo_megatron.trainer")

SUMMARY_KEYS = ("reward/mean", "reward/ref_mean", "train/accuracy", "eval/accuracy", "loss",
                "adv/mean_abs_advantage", "adv/mean_abs_advantage_no_margin", "adv/zero_variance_group_fraction",
                "response/len_mean", "mismatch/mean", "kl/reference", "grad_norm", "time/step", "tokens_per_s")
PLOT_KEYS = ("reward/mean", "reward/ref_mean", "train/accuracy", "eval/accuracy", "adv/zero_variance_group_fraction",
             "loss")


@contextlib.contextmanager
def phase_timer(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Add the wall time of the block (seconds) to metrics[f"time/{name}"], also when it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{name}"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0


class Progress:
    """A tqdm bar on a terminal (logging.progress_bar), else one log line per step (rank 0's; silent elsewhere)."""

    def __init__(self, total: int, start: int, enabled: bool, bar: bool):
        self.total = total
        self.enabled = enabled
        self.bar: Any = None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(total=total, initial=start, desc="aapo", unit="step")

    def update(self, step: int, m: dict[str, float]) -> None:
        """Show step `step`'s reward, loss, |A| and time."""
        if not self.enabled:
            return
        text = (f"reward {m.get('reward/mean', float('nan')):.3f}  loss {m.get('loss', float('nan')):.4f}  "
                f"|A| {m.get('adv/mean_abs_advantage', float('nan')):.3f}  {m['time/step']:.1f}s/step")
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            log.info("step %d/%d (%.0f%%)  %s", step, self.total, 100 * step / self.total, text)

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()


def print_summary(run_dir: str, history: list[dict[str, Any]], plots: bool, steps: int) -> Optional[str]:
    """The summary table (stderr), curves.png (if `plots`) and summary.json (eval accuracy before/after, when
    evaluated at least twice) of the RL records in `history`; returns the plot path, if written."""
    hist = [r for r in history if r.get("step", 0) >= 0]
    print("\n" + summary_table(hist, SUMMARY_KEYS), file=sys.stderr)
    path = write_plots(run_dir, hist, PLOT_KEYS) if plots else None
    if path:
        log.info("plots: %s", path)
    evals = [r["eval/accuracy"] for r in hist if "eval/accuracy" in r]
    if len(evals) >= 2:
        log.info("held-out accuracy: %.4f before RL -> %.4f after", evals[0], evals[-1])
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump({"eval_accuracy_before": evals[0], "eval_accuracy_after": evals[-1], "steps": steps}, fh,
                      indent=1)
    return path
