"""Fast tests without an engine: weight-sync buckets, stage timeouts, the file and shared-memory streams."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from aapo_megatron.rollout.weight_sync import (
    FileSink,
    ShmSlots,
    StageRunner,
    WeightSyncError,
    WeightSyncTimeout,
    iter_buckets,
    stream_via_files,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [(f"w{i}", torch.randn(n, generator=g)) for i, n in enumerate([100, 300, 50, 1000, 20, 20])]


def test_iter_buckets_respects_size_and_order():
    named = _tensors()
    buckets = list(iter_buckets(iter(named), bucket_bytes=1600))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    for b in buckets:  # a bucket exceeds the size only when it holds one oversize tensor
        assert sum(t.numel() * 4 for _, t in b) <= 1600 or len(b) == 1
    flat = [(n, t) for b in buckets for n, t in b]
    assert all(torch.equal(a[1], b[1]) and a[0] == b[0] for a, b in zip(flat, named))


def test_iter_buckets_casts_and_rejects_bad_input():
    (b,) = list(iter_buckets([("x", torch.ones(4)), ("i", torch.arange(3))], 1 << 20, dtype=torch.bfloat16))
    assert b[0][1].dtype == torch.bfloat16 and b[1][1].dtype == torch.int64  # integers are left alone
    with pytest.raises(ValueError, match="'x' appears twice"):
        list(iter_buckets([("x", torch.ones(1)), ("x", torch.ones(1))], 1024))
    with pytest.raises(TypeError, match="weight 'x' is a list"):
        list(iter_buckets([("x", [1.0])], 1024))


def test_stage_runner_names_the_hung_stage():
    runner = StageRunner(timeout_s=0.3)
    release = threading.Event()
    with pytest.raises(WeightSyncTimeout, match=r"stage 'load bucket 7' did not finish within 0.3 s"):
        runner.run("load bucket 7", lambda: release.wait(10))
    release.set()
    runner.close()
    runner = StageRunner(timeout_s=5)
    with pytest.raises(WeightSyncError, match=r"stage 'finish' failed: KeyError: 'boom'"):
        runner.run("finish", lambda: {}["boom"])
    assert runner.run("begin", lambda: 42) == 42
    runner.close()


class _DirSink:
    """A file sink that reads every bucket back with safetensors (the engine's side, minus vLLM)."""

    def __init__(self, fail_on_load: int = -1):
        self.received: dict[str, torch.Tensor] = {}
        self.calls: list[str] = []
        self.fail_on_load = fail_on_load
        self.seen_files: list[str] = []

    def sink(self) -> FileSink:
        from safetensors.torch import load_file

        def load(path):
            self.calls.append("load")
            self.seen_files.append(path)
            assert len(os.listdir(os.path.dirname(path))) <= 2, "at most two bucket files at once"
            if len(self.seen_files) - 1 == self.fail_on_load:
                raise RuntimeError("engine rejected the bucket")
            self.received.update(load_file(path))

        return FileSink(begin=lambda: self.calls.append("begin"), load=load,
                        finish=lambda: self.calls.append("finish"), abort=lambda: self.calls.append("abort"))


def test_stream_via_files_roundtrip_and_cleanup(tmp_path):
    named = _tensors()
    named.append(("tied_view", named[0][1][:10]))  # a view: safetensors needs its own storage
    s = _DirSink()
    stats = stream_via_files(s.sink(), iter(named), bucket_bytes=1600, timeout_s=30, shm_dir=str(tmp_path))
    assert s.calls == ["begin"] + ["load"] * stats.num_buckets + ["finish"]
    assert stats.num_tensors == len(named) and stats.num_bytes == sum(t.numel() * 4 for _, t in named)
    assert set(s.received) == {n for n, _ in named}
    for n, t in named:
        assert torch.equal(s.received[n], t)
    assert os.listdir(tmp_path) == []


def test_stream_via_files_failure_aborts_and_cleans(tmp_path):
    s = _DirSink(fail_on_load=1)
    with pytest.raises(WeightSyncError, match=r"stage 'load bucket 1' failed: RuntimeError: engine rejected"):
        stream_via_files(s.sink(), iter(_tensors()), bucket_bytes=1600, timeout_s=30, shm_dir=str(tmp_path))
    assert s.calls[-1] == "abort" and "finish" not in s.calls
    assert os.listdir(tmp_path) == []
    with pytest.raises(WeightSyncError, match="weight stream was empty"):
        stream_via_files(_DirSink().sink(), iter([]), bucket_bytes=1600, timeout_s=30, shm_dir=str(tmp_path))
    with pytest.raises(ValueError, match="bucket size must be > 0"):
        stream_via_files(_DirSink().sink(), iter([]), bucket_bytes=0, timeout_s=30, shm_dir=str(tmp_path))


def test_stream_via_files_failure_waits_for_the_bucket_being_written(tmp_path):
    """When a load fails, the next bucket is still being gathered and written into the scratch directory;
    the call returns only after that write ended and the directory is gone (CI once saw the directory left)."""
    events = []

    def slow_stream():
        for name, t in _tensors():
            if name == "w4":  # pulled to close bucket 2 ([w3]), which is gathered while bucket 1 fails to load
                time.sleep(0.5)
                events.append("bucket 2 gathered")
            yield name, t

    with pytest.raises(WeightSyncError, match="engine rejected"):
        stream_via_files(_DirSink(fail_on_load=1).sink(), slow_stream(), bucket_bytes=1600, timeout_s=30,
                         shm_dir=str(tmp_path))
    events.append("returned")
    assert events == ["bucket 2 gathered", "returned"]
    assert os.listdir(tmp_path) == []


def test_stream_via_files_hung_receiver_times_out_without_abort(tmp_path):
    release = threading.Event()
    calls = []

    def hung_load(path):
        release.wait(120)
        calls.append("load returned")

    sink = FileSink(begin=lambda: None, load=hung_load, finish=lambda: calls.append("finish"),
                    abort=lambda: calls.append("abort"))
    with pytest.raises(WeightSyncTimeout, match=r"stage 'load bucket 0' did not finish within 0.5 s"):
        stream_via_files(sink, iter(_tensors()), bucket_bytes=1600, timeout_s=0.5, shm_dir=str(tmp_path))
    # It gave up on the receiver, which is still hung (released only below), and queued nothing behind it.
    assert calls == [] and not release.is_set()
    release.set()
    assert os.listdir(tmp_path) == []


def _read_slot(path: str, entries: list) -> dict[str, torch.Tensor]:
    """What the engine sees: the slot file read through its own handle, entries [name, dtype, shape, offset]."""
    with open(path, "rb") as fh:
        raw = bytearray(fh.read())
    buf = torch.frombuffer(raw, dtype=torch.uint8)
    out = {}
    for name, dtype, shape, offset in entries:
        dt = getattr(torch, dtype)
        n = int(torch.tensor(shape, dtype=torch.int64).prod()) * dt.itemsize
        out[name] = buf[offset:offset + n].view(dt).view(shape).clone()
    return out


def test_shm_slots_roundtrip_reuse_growth_and_cleanup(tmp_path):
    g = torch.Generator().manual_seed(0)
    named = _tensors() + [
        ("bf16", torch.randn(7, 3, generator=g).to(torch.bfloat16)),
        ("transposed", torch.randn(5, 4, generator=g).t()),       # non-contiguous source
        ("ids", torch.arange(11, dtype=torch.int64)),
        ("scalar", torch.tensor(3.5)),
    ]
    slots = ShmSlots(str(tmp_path))
    seen: list[tuple[str, int]] = []
    received: dict[str, torch.Tensor] = {}

    def load(payload):
        path, slot, entries = payload
        seen.append((path, slot))
        received.update(_read_slot(path, entries))

    sink = FileSink(begin=lambda: None, load=load, finish=lambda: None, abort=lambda: None, write=slots.write)
    stats = stream_via_files(sink, iter(named), bucket_bytes=1600, timeout_s=30)
    assert stats.num_buckets >= 3 and stats.num_tensors == len(named)
    assert [s for _, s in seen] == [k % 2 for k in range(stats.num_buckets)]  # double buffer
    assert set(received) == {n for n, _ in named}
    for n, t in named:
        assert received[n].dtype == t.dtype and torch.equal(received[n], t), n
    files = sorted(os.listdir(slots.dir))
    assert len(files) == 2

    # a second sync reuses both files (no new tmpfs allocation), with the new values
    first_paths = {p for p, _ in seen}
    seen.clear()
    stream_via_files(sink, iter([(n, t + 1) for n, t in named[:6]]), bucket_bytes=1600, timeout_s=30)
    assert {p for p, _ in seen} <= first_paths and sorted(os.listdir(slots.dir)) == files
    assert torch.equal(received["w3"], named[3][1] + 1)

    # a bucket larger than the slot grows it under a new name (the engine remaps) and drops the old file
    big = torch.randn(5000, generator=g)
    path, slot, entries = slots.write([("big", big)], 0)
    assert slot == 0 and os.path.basename(path) not in files
    assert torch.equal(_read_slot(path, entries)["big"], big)
    assert len(os.listdir(slots.dir)) == 2

    slots.close()
    assert not os.path.exists(slots.dir)
    slots.close()  # idempotent
