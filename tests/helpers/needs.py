"""Skip marks for tests that need root and tools of the host."""

from __future__ import annotations

import os
import shutil

import pytest


def needs_root_and(*tools: str) -> pytest.MarkDecorator:
    """Skip unless running as root with every one of `tools` on PATH; the reason names what lacks."""
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [tool for tool in tools if shutil.which(tool) is None]
    return pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing))
