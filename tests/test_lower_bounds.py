"""The lower bounds pyproject.toml declares for timm and accelerate, installed and run (scripts/check_lower_bounds.sh).

It builds a virtual environment from the package registry (a few minutes), so it runs only when asked for.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def declared_bound(package: str) -> str:
    match = re.search(rf'"{package}>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, f"pyproject.toml states no lower bound for {package}"
    return match[1]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FCMAE_CHECK_LOWER_BOUNDS"),
                    reason="builds a venv from the registry: set FCMAE_CHECK_LOWER_BOUNDS=1 to run it")
def test_declared_lower_bounds_install_import_and_pretrain():
    timm, accelerate = declared_bound("timm"), declared_bound("accelerate")
    accelerate = accelerate if accelerate.count(".") == 2 else accelerate + ".0"
    env = {**os.environ, "TIMM": timm, "ACCELERATE": accelerate}
    result = subprocess.run(["bash", "scripts/check_lower_bounds.sh"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == f"lower bounds OK: timm {timm}, accelerate {accelerate}"
