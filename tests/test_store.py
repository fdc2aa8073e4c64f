"""The stage store's trust in a finished output: hashed when it is made, and on reuse only when its
size or time says it may have changed."""

from __future__ import annotations

import json
import os

import pytest

from ltscale.stages import store as store_module
from ltscale.stages.store import Store


@pytest.fixture
def hashes(monkeypatch):
    """The files the store hashes, in order."""
    seen: list[str] = []
    real = store_module.file_checksum

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(store_module, "file_checksum", counting)
    return seen


def _finished_output(tmp_path):
    store = Store(tmp_path)
    directory = store.directory("soft_labels", "k1")
    directory.mkdir(parents=True)
    (directory / "soft_labels.pt").write_bytes(b"x" * 4096)
    (directory / "extra.json").write_text("{}")
    store.finish("soft_labels", "soft_labels", "k1", {"files": {"soft_labels": "soft_labels.pt", "extra": "extra.json"}})
    return store, directory


def test_an_unchanged_output_is_reused_without_hashing(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    assert sorted(hashes) == ["extra.json", "soft_labels.pt"]  # once, when the stage finishes
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["stats"]["soft_labels"][0] == 4096
    hashes.clear()
    for _ in range(3):
        assert store.finished("soft_labels", "soft_labels", "k1") is not None
    assert hashes == []


def test_a_touched_file_is_hashed_once_then_remembered(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    hashes.clear()
    path = directory / "soft_labels.pt"
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # copied or touched: same bytes, new time
    assert store.finished("soft_labels", "soft_labels", "k1") is not None
    assert hashes == ["soft_labels.pt"]
    assert json.loads((directory / "verified.json").read_text())["soft_labels"] == [4096, status.st_mtime_ns + 10**9]
    assert store.finished("soft_labels", "soft_labels", "k1") is not None
    assert hashes == ["soft_labels.pt"]  # not again


def test_changed_or_missing_files_are_not_trusted(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    path = directory / "soft_labels.pt"
    path.write_bytes(b"y" * 4096)  # same size, new bytes (and a new time)
    assert store.finished("soft_labels", "soft_labels", "k1") is None
    path.write_bytes(b"x" * 100)  # truncated
    assert store.finished("soft_labels", "soft_labels", "k1") is None
    path.unlink()
    assert store.finished("soft_labels", "soft_labels", "k1") is None


def test_a_changed_file_is_caught_even_after_its_time_was_remembered(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    path = directory / "soft_labels.pt"
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert store.finished("soft_labels", "soft_labels", "k1") is not None  # remembered in verified.json
    path.write_bytes(b"z" * 4096)  # then edited: its time moves on from the remembered one
    assert store.finished("soft_labels", "soft_labels", "k1") is None


def test_outputs_finished_before_stats_were_recorded_are_hashed_then_remembered(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["stats"]  # a manifest written by an earlier version
    manifest_path.write_text(json.dumps(manifest))
    hashes.clear()
    assert store.finished("soft_labels", "soft_labels", "k1") is not None
    assert sorted(hashes) == ["extra.json", "soft_labels.pt"]
    assert store.finished("soft_labels", "soft_labels", "k1") is not None
    assert len(hashes) == 2


def test_finishing_again_forgets_an_earlier_outputs_verified_times(tmp_path, hashes):
    store, directory = _finished_output(tmp_path)
    (directory / "verified.json").write_text(json.dumps({"soft_labels": [4096, 1]}))
    (directory / "soft_labels.pt").write_bytes(b"w" * 4096)
    store.finish("soft_labels", "soft_labels", "k1", {"files": {"soft_labels": "soft_labels.pt", "extra": "extra.json"}})
    assert not (directory / "verified.json").exists()
    assert store.finished("soft_labels", "soft_labels", "k1") is not None


def test_store_verify_reads_every_byte_and_names_what_reuse_would_miss(tmp_path, capsys):
    """An edit that keeps a file's size and time passes reuse's check; `ltscale store verify` does
    not let it pass."""
    from ltscale.cli import main

    store, directory = _finished_output(tmp_path)
    other = store.directory("teacher", "k2")
    other.mkdir()
    (other / "model.pt").write_bytes(b"m" * 100)
    store.finish("teacher", "teacher", "k2", {"files": {"model": "model.pt"}})
    store.directory("student", "k3").mkdir()  # a stage still training: no manifest yet
    assert main(["store", "verify", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 stage outputs: 2 ok, 1 unfinished, 0 changed" in out

    path = directory / "soft_labels.pt"
    status = path.stat()
    path.write_bytes(b"q" * 4096)  # same size...
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))  # ...and time
    assert store.finished("soft_labels", "soft_labels", "k1") is not None  # reuse cannot tell
    assert main(["store", "verify", "--output-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"CHANGED  {directory}: soft_labels.pt does not match its checksum" in captured.out
    assert "2 ok, 1 unfinished, 1 changed" not in captured.out and "1 ok, 1 unfinished, 1 changed" in captured.out
    assert "delete its manifest.json" in captured.err
    assert main(["store", "verify", "--output-dir", str(tmp_path / "nowhere")]) == 2
    assert "no stage store at" in capsys.readouterr().err


@pytest.mark.parametrize("edit, problem", [
    (lambda m: [1, 2, 3], "holds a list, not an object"),
    (lambda m: {**m, "files": "model.pt"}, "'files' is not a mapping of roles to file names"),
    (lambda m: {**m, "checksums": "xyz"}, "'checksums' does not give a sha256 for each of the files ['model']"),
    (lambda m: {**m, "checksums": {}}, "'checksums' does not give a sha256 for each of the files ['model']"),
    (lambda m: {**m, "stats": [1, 2]}, "'stats' is not a mapping of roles to [size, modification time]"),
    (lambda m: {**m, "stats": {"model": ["big", 2]}}, "'stats' is not a mapping of roles to [size, modification time]"),
])
def test_a_manifest_of_the_wrong_shape_is_not_trusted_and_named(tmp_path, capsys, edit, problem):
    """Valid JSON that is not a manifest (hand-edited, another tool's file) is treated like an
    unreadable manifest: reuse recomputes the stage and `store verify` names what is wrong."""
    from ltscale.cli import main

    store = Store(tmp_path)
    directory = store.directory("teacher", "k2")
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(b"m" * 100)
    store.finish("teacher", "teacher", "k2", {"files": {"model": "model.pt"}})
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps(edit(manifest)))
    assert store.finished("teacher", "teacher", "k2") is None
    assert main(["store", "verify", "--output-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"CHANGED  {directory}: unreadable manifest (manifest.json" in captured.out and problem in captured.out
    assert "the next run of its pipeline resumes or re-runs that stage" in captured.err
    assert "not recomputed while its files keep" not in captured.err


def test_an_output_under_another_key_is_not_trusted(tmp_path, hashes):
    """The manifest names the key it was finished under: a directory copied or renamed to another
    key's name is not that key's output (its files are intact, so only the key tells)."""
    store, directory = _finished_output(tmp_path)
    directory.rename(store.directory("soft_labels", "k2"))
    assert store.finished("soft_labels", "soft_labels", "k2") is None
    assert store.finished("soft_labels", "soft_labels", "k1") is None  # (gone from its own place)
