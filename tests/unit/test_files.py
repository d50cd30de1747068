"""Atomic, durable writes (dmea_dist.files) and the writers of run files that go through them."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict

import pytest
import torch

from dmea_dist import files
from dmea_dist.method import adapt_checkpoint
from dmea_dist.method.adaptation import AdaptResult
from dmea_dist.modeling.io import load_modules, save_modules
from dmea_dist.modeling.model import DMEAModel
from dmea_dist.state import RunState, load_state, save_state
from tests.unit.disk_log import DiskLog


def test_a_write_syncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Without the directory's fsync a machine crash can lose the rename: state.json as it was, or none."""
    disk = DiskLog(monkeypatch)
    target = save_state(RunState.new(["a"]), tmp_path)
    kinds = [event[0] for event in disk.events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert disk.events[0][1] == disk.events[1][1] != str(target)  # the temp file's data, then its rename
    assert disk.events[2] == ("fsync", str(tmp_path))
    assert disk.why_not_durable(target) is None and load_state(tmp_path).task_ids == ["a"]


def test_directories_a_write_makes_are_synced_into_their_parents(tmp_path, monkeypatch):
    """tasks/003-x/ made for its first record.json: its entry in tasks/ must reach the disk too."""
    disk = DiskLog(monkeypatch)
    files.write_bytes(tmp_path / "tasks" / "003-x" / "record.json", b"{}")
    for folder in (tmp_path, tmp_path / "tasks", tmp_path / "tasks" / "003-x"):
        assert disk.directory_synced(folder), folder
    assert disk.why_not_durable(tmp_path / "tasks" / "003-x" / "record.json") is None


def test_a_file_written_by_name_gets_the_run_files_mode_and_no_temp_is_left(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    with files.atomic_path(tmp_path / "w.bin") as partial:
        partial.write_bytes(b"abc")  # as save_file or write_table would, by name
    assert os.stat(tmp_path / "w.bin").st_mode == os.stat(plain).st_mode
    with pytest.raises(RuntimeError), files.atomic_path(tmp_path / "w.bin") as partial:
        partial.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "w.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "w.bin"]


def test_a_directory_the_filesystem_cannot_sync_is_left_but_a_failing_disk_is_an_error(tmp_path, monkeypatch):
    """Some network mounts answer EINVAL to a directory fsync: the write stands. A full disk is an error."""
    real = os.fsync

    def fsync(fd, *, err):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, err=errno.EINVAL))
    assert files.write_text(tmp_path / "a", "x").read_text() == "x"
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, err=errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        files.write_text(tmp_path / "a", "y")


def test_module_weights_reach_the_disk_before_their_name_and_manifest(tmp_path, tiny_gpt2_config, monkeypatch):
    """save_file wrote the weights and os.replace renamed them with no fsync: after a machine crash the
    manifest could name an empty or short modules.safetensors (a checksum error on resume)."""
    model = DMEAModel.from_config(tiny_gpt2_config)
    model.set_path("t", model.add_modules())
    disk = DiskLog(monkeypatch)
    folder = save_modules(model, tmp_path / "state" / "modules-1")
    weights = next(i for i, e in enumerate(disk.events) if e[0] == "replace" and e[2].endswith("modules.safetensors"))
    manifest = next(i for i, e in enumerate(disk.events) if e[0] == "replace" and e[2].endswith("manifest.json"))
    assert weights < manifest
    for name in ("modules.safetensors", "manifest.json"):
        assert disk.why_not_durable(folder / name) is None
    assert disk.directory_synced(tmp_path / "state")  # modules-1/ itself is in its parent
    assert not list(folder.glob(".*tmp"))


def test_module_weights_that_fail_to_reach_the_disk_keep_the_previous_save(tmp_path, tiny_gpt2_config,
                                                                           monkeypatch):
    model = DMEAModel.from_config(tiny_gpt2_config)
    model.set_path("t", model.add_modules())
    folder = save_modules(model, tmp_path / "m")
    model.set_path("u", model.add_modules())

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        save_modules(model, folder)
    monkeypatch.undo()
    again = DMEAModel.from_config(tiny_gpt2_config)
    load_modules(again, folder)  # the previous save, whole: its checksum matches
    assert list(again.paths) == ["t"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "modules.safetensors"]


def test_an_adaptation_checkpoint_is_on_disk_before_the_progress_file_names_it(tmp_path, monkeypatch):
    """The engine's files and the RNG file, written in place, must be fsynced before adapt_progress.json
    names their folder, or a crash leaves a progress file over a folder a resume cannot load."""

    class Engine:  # writes its files in place, as DeepSpeed's save_checkpoint does
        def save_checkpoint(self, directory, tag):
            (directory / tag).mkdir(parents=True)
            torch.save({"w": torch.zeros(2)}, directory / tag / "mp_rank_00_model_states.pt")

    disk = DiskLog(monkeypatch)
    adapt_checkpoint.save(Engine(), tmp_path, digest="job", steps=4, result=AdaptResult(steps=4), rank=0)
    progress = json.loads((tmp_path / adapt_checkpoint.PROGRESS).read_text())
    assert progress["tag"] == "step0000004" and progress["result"] == asdict(AdaptResult(steps=4))
    named = next(i for i, e in enumerate(disk.events) if e[0] == "replace" and e[2].endswith(adapt_checkpoint.PROGRESS))
    before = disk.events[:named]
    for name in ("mp_rank_00_model_states.pt", "rng-rank0.safetensors"):
        assert ("fsync", str(tmp_path / "step0000004" / name)) in before, name
    assert ("fsync", str(tmp_path)) in before  # the tag folder's own entry


def test_the_backbone_cache_is_on_disk_before_its_name_and_its_name_after(tmp_path, monkeypatch):
    """A cache folder renamed into place before its files reached the disk can come back from a machine crash as
    a folder of empty weights under the real name, which every later run of that config would load."""
    from dmea_dist.run import _publish

    disk = DiskLog(monkeypatch)
    cache = tmp_path / "_cache" / "backbone-0123"
    _publish(cache, lambda folder: ((folder / "model.safetensors").write_bytes(b"weights"),
                                    (folder / "config.json").write_text("{}")))
    renamed = next(i for i, e in enumerate(disk.events) if e[0] == "replace" and e[2] == str(cache))
    private = disk.events[renamed][1]
    for name in ("model.safetensors", "config.json"):
        assert ("fsync", f"{private}/{name}") in disk.events[:renamed], name
    assert ("fsync", str(cache.parent)) in disk.events[renamed:]
    assert disk.directory_synced(tmp_path)  # _cache/ made for it
    plain = tmp_path / "plain"
    plain.mkdir()
    assert os.stat(cache).st_mode == os.stat(plain).st_mode


def test_the_backbone_cache_keeps_the_group_a_shared_folder_gives_its_subfolders(tmp_path):
    """A team's output_dir is often setgid, so that whatever anyone writes in it belongs to the team's group. A
    plain mkdir inherits the bit; `_publish` reset mkdtemp's 0700 with a chmod that cleared it, so the cache and
    the weights written into it took the writer's own group."""
    import stat

    from dmea_dist.run import _publish

    shared = tmp_path / "_cache"
    shared.mkdir()
    os.chmod(shared, os.stat(shared).st_mode | stat.S_ISGID)
    plain = shared / "plain"
    plain.mkdir()
    if not os.stat(plain).st_mode & stat.S_ISGID:  # ext4, XFS, tmpfs and NFS pass it on; a folder of another group not
        pytest.skip("this filesystem or folder does not pass a setgid bit on to subfolders")
    _publish(shared / "backbone-0123", lambda folder: (folder / "model.safetensors").write_bytes(b"weights"))
    assert os.stat(shared / "backbone-0123").st_mode == os.stat(plain).st_mode
    assert sorted(p.name for p in shared.iterdir()) == ["backbone-0123", "plain"]
