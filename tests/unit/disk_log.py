"""A record of what reaches the disk durably: every os.fsync (by the path its descriptor names) and os.replace.

A boundary fake for the durability tests: both calls go through to the real ones, in order, and are logged.
A file survives a machine crash once its data was fsynced under the name it now has, or under a temporary
name renamed to it afterwards, and the directory holding that name was fsynced after the name appeared.
"""

from __future__ import annotations

import os
from pathlib import Path


class DiskLog:
    def __init__(self, monkeypatch):
        self.events: list[tuple[str, ...]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            self.events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def _synced(self, path: str, after: int = -1) -> int | None:
        """Index of the first fsync of `path` after event `after`, or None."""
        return next((i for i, e in enumerate(self.events) if i > after and e == ("fsync", path)), None)

    def why_not_durable(self, file: str | Path) -> str | None:
        """None if `file`'s data and name are on disk by the log, else what is missing."""
        file = str(Path(file).resolve())
        named = max((i for i, e in enumerate(self.events) if e[0] == "replace" and e[2] == file), default=None)
        if named is not None:  # renamed into place: its temp file fsynced before, its directory after
            src = self.events[named][1]
            if not any(e == ("fsync", src) for e in self.events[:named]):
                return f"{file}: renamed from {src}, which was never fsynced before the rename"
            if self._synced(os.path.dirname(file), after=named) is None:
                return f"{file}: its directory was not fsynced after the rename"
            return None
        data = self._synced(file)
        if data is None:
            return f"{file}: never fsynced"
        if self._synced(os.path.dirname(file), after=data) is None:
            return f"{file}: its directory was not fsynced after it was written"
        return None

    def directory_synced(self, directory: str | Path) -> bool:
        return self._synced(str(Path(directory).resolve())) is not None
