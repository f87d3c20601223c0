"""Atomic checkpoint directories: sealing, latest pointer, pruning, partial/corrupt detection and fallback."""

import os

import pytest

from aapo_megatron.checkpoint.errors import CheckpointError
from aapo_megatron.checkpoint.manager import CheckpointManager, verify


def _payload(step):
    def write(d):
        os.makedirs(os.path.join(d, "model"), exist_ok=True)
        with open(os.path.join(d, "model", "weights.bin"), "wb") as fh:
            fh.write(bytes([step % 256]) * (100 + step))
        with open(os.path.join(d, "trainer_state.json"), "w") as fh:
            fh.write(f'{{"step": {step}}}')
    return write


def test_save_publishes_and_prunes(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (10, 20, 30):
        info = mgr.save(step, _payload(step))
        assert info.step == step
    assert [c.step for c in mgr.list_valid()] == [20, 30]
    assert (tmp_path / "latest").read_text().strip() == "step_00000030"
    assert mgr.resolve("auto").step == 30
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    mgr.save(10, _payload(10))

    def crash(d):
        _payload(20)(d)
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(20, crash)
    assert os.path.isdir(tmp_path / "step_00000020.tmp")
    assert mgr.resolve("auto").step == 10
    mgr.save(30, _payload(30))
    assert not os.path.exists(tmp_path / "step_00000020.tmp")


def test_corrupt_latest_falls_back_to_older(tmp_path, caplog):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    mgr.save(10, _payload(10))
    mgr.save(20, _payload(20))
    weights = tmp_path / "step_00000020" / "model" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match=r"model/weights.bin has 50 bytes, the manifest says 120"):
        verify(str(tmp_path / "step_00000020"))
    with caplog.at_level("WARNING"):
        assert mgr.resolve("auto").step == 10
    assert "skipping checkpoint" in caplog.text


def test_missing_manifest_and_missing_file(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(5, _payload(5))
    d = tmp_path / "step_00000005"
    os.remove(d / "trainer_state.json")
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        verify(str(d))
    os.remove(d / "MANIFEST.json")
    with pytest.raises(CheckpointError, match=r"is partial: MANIFEST.json is missing \(the save did not finish\)"):
        mgr.resolve(str(d))
    assert mgr.resolve("auto") is None
    assert mgr.resolve(None) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.resolve(str(tmp_path / "nope"))


def test_unreadable_manifest(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, _payload(1))
    (tmp_path / "step_00000001" / "MANIFEST.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable MANIFEST.json"):
        verify(str(tmp_path / "step_00000001"))


def test_same_size_corruption_falls_back_with_a_warning(tmp_path, caplog):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    mgr.save(10, _payload(10))
    mgr.save(20, _payload(20))
    newest = tmp_path / "step_00000020"
    shard = newest / "model" / "weights.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    assert verify(str(newest), checksums=False).step == 20  # sizes alone cannot see it
    with pytest.raises(CheckpointError, match=r"model/weights.bin does not match its sha256 in MANIFEST.json"):
        verify(str(newest))
    with caplog.at_level("WARNING"):
        assert mgr.resolve("auto").step == 10
    assert "skipping checkpoint" in caplog.text and "does not match its sha256" in caplog.text


def test_manifest_lists_size_and_sha256_of_every_file(tmp_path):
    import hashlib
    import json

    mgr = CheckpointManager(str(tmp_path))
    mgr.save(3, _payload(3))
    d = tmp_path / "step_00000003"
    files = json.loads((d / "MANIFEST.json").read_text())["files"]
    assert sorted(files) == ["model/weights.bin", "trainer_state.json"]
    for rel, entry in files.items():
        body = (d / rel).read_bytes()
        assert entry == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
