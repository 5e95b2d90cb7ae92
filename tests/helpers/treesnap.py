"""A byte-exact fingerprint of a directory tree, to prove nothing wrote into it."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

Fingerprint = tuple[int, int, int, int, int, str]


def tree_snapshot(root: Path) -> dict[str, Fingerprint]:
    """{relative path: (mode, uid, gid, size, mtime_ns, content sha256 or link target)} of
    every entry below and including `root`; symlinks are never followed. A directory's mtime
    changes when anything is created in it, even if removed again."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            found[str(path.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content,
            )  # fmt: skip
    return found
