"""Atomic, durable writes: the one way a run's state and records reach the disk.

Every file a resumed run or a reader relies on (state.json, record.json, R.npy, module weights and manifests,
bases, pseudo samples) is written here, so that
- a reader sees the old file or the new one, never half of one: the data goes to a temporary file beside the
  target, which `os.replace` then renames over it;
- once a write returns, the new file survives a machine crash, not only a killed process. The temporary file is
  fsynced before the rename (otherwise the rename can reach the disk before the data, leaving an empty or short
  file under the real name), and the directory after it (the rename is a change of the directory, lost with it
  otherwise; ext4 and XFS document this). Directories made for the file are fsynced into their parents likewise.

Writers that name their output themselves (safetensors' `save_file`, Parquet's `write_table`) write to the path
`atomic_path` yields; whole folders written by a library (`save_pretrained`, DeepSpeed checkpoints) under a
name nothing refers to yet are made durable with `sync_tree` before the state names them.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask: from /proc where it says it (Linux), else by setting it and back, which briefly
    races files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; run files get the mode a plain open() gives (colleagues on a shared filesystem read
# them). Read once, at import.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write by name; on a clean exit it is fsynced, renamed to
    `path` and the directory fsynced. On an error the temporary file is removed and `path` is as it was."""
    path = Path(path)
    make_dirs(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _sync_file(tmp, mode=FILE_MODE)  # not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically and durably (module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`write_text` for bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def make_dirs(directory: str | os.PathLike) -> None:
    """`mkdir -p` that fsyncs each parent that gained a directory, so a file written inside survives a crash."""
    directory = Path(directory)
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # exist_ok: another process may make it first
        sync_directory(folder.parent)


def sync_tree(directory: str | os.PathLike) -> Path:
    """fsync every file and folder under `directory`, then `directory` into its parent; returns `directory`.
    For folders a library wrote in place under a name that no state or record names yet."""
    directory = Path(directory)
    for root, dirs, files in os.walk(directory):
        for name in files:
            _sync_file(Path(root) / name)
        for name in dirs:
            sync_directory(Path(root) / name)
    sync_directory(directory)
    sync_directory(directory.parent)
    return directory


def sync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, making the renames and new entries in it durable. Filesystems that cannot (some
    network mounts answer EINVAL) are left as they are: their rename is as durable as they make it."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _sync_file(file: Path, *, mode: int | None = None) -> None:
    # fsync flushes the file's data whichever descriptor it is called on, so a file a library wrote and closed
    # is synced by reopening it
    fd = os.open(file, os.O_RDONLY)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
