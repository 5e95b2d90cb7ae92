"""The host image, built once per run (or found in the cache) for every test here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.image.build import ensure_image


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = tmp_path_factory.mktemp("image") / "build.log"
    try:
        return ensure_image(log)
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"the image build failed ({exc}):\n{tail}") from exc
