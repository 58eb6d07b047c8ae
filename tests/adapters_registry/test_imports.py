"""The registry must stay installable on a training box without torch, numpy or the kvrun engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
MODULES = [
    "adapters_registry", "adapters_registry.cli", "adapters_registry.cli_commands", "adapters_registry.redis_store",
    "adapters_registry.file_store", "adapters_registry.validate", "adapters_registry.safetensors_format",
]  # fmt: skip


def test_no_torch_numpy_or_kvrun_imported() -> None:
    code = (
        f"import sys\nfor module in {MODULES!r}:\n    __import__(module)\n"
        "from tqdm import tqdm\n"  # the CLI's progress bar, imported lazily
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'kvrun')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPOSITORY, check=True)
    assert result.stdout.strip() == "[]"


def test_source_never_names_them() -> None:
    for path in (REPOSITORY / "adapters_registry").glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert stripped.split()[1].split(".")[0] not in ("torch", "numpy", "kvrun"), f"{path.name}: {line}"
