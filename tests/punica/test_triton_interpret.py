"""The Triton LoRA kernels on CPU through Triton's interpreter (skipped when triton is not installed).

The checks run in a child process with TRITON_INTERPRET=1 (see interpret_check.py for why), at tiny sizes: about
5-15 s on a 2-core machine. `make test` installs triton (the dev extra), so CI runs them; the wider cases are slow.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e '.[dev]')"
)


def _interpret(*args: str) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=python_path)
    return subprocess.run(
        [sys.executable, "-m", "tests.punica.interpret_check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_triton_kernels_match_reference_in_interpreter() -> None:
    result = _interpret()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_triton_kernels_match_reference_in_interpreter_at_wider_shapes() -> None:
    result = _interpret("--extended")
    assert result.returncode == 0, result.stdout + result.stderr
