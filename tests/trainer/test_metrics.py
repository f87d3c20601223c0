"""Metrics JSONL (resume truncation, NaN safety), summary table and plots."""

import json
import os
import signal

from aapo_megatron.config import LoggingConfig
from aapo_megatron.trainer.metrics import MetricsLogger, read_metrics, summary_table, write_plots
from aapo_megatron.trainer.signals import StopRequest


def test_jsonl_resume_drops_records_after_checkpoint(tmp_path):
    cfg = LoggingConfig(tensorboard=True)
    log = MetricsLogger(str(tmp_path), cfg)
    for step in range(1, 6):
        log.log(step, {"reward": step * 0.1, "loss": float("nan") if step == 3 else 1.0 / step})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[2])["loss"] == "nan"  # valid JSON, not a bare NaN
    assert os.listdir(tmp_path / "tb")
    resumed = MetricsLogger(str(tmp_path), cfg, resume_step=3)
    assert [r["step"] for r in resumed.history] == [1, 2, 3]
    resumed.log(4, {"reward": 9.0})
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]
    fresh = MetricsLogger(str(tmp_path), cfg)  # a fresh run starts a new history
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [] and fresh.history == []


def test_torn_last_line_is_ignored(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    assert read_metrics(str(p)) == [{"step": 1, "reward": 0.5}]


def test_summary_and_plots(tmp_path):
    hist = [{"step": s, "reward": 0.1 * s, "accuracy": 0.5} for s in range(1, 4)]
    table = summary_table(hist, ["reward", "accuracy", "absent"])
    assert "reward" in table and "0.3" in table and "absent" not in table
    path = write_plots(str(tmp_path), hist, ["reward", "accuracy"])
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert write_plots(str(tmp_path), hist, ["absent"]) is None


def test_stop_request_catches_sigusr1_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before
