"""The repository keeps its promises: the README's two commands, CI running the README's test command,
the torch pin everywhere something is installed, and the product boundaries."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "fabric", "trainer")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None and text.index(block.group(0)) < 200, "the README must open with its commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_a_train_and_a_test_command_and_ci_runs_the_test_one() -> None:
    train, test = _readme_commands()
    assert train.endswith("nox -s demo")
    assert test.endswith("nox -t ci")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^nox -t ci$", ci, re.M), ".ci/run must run the README's test command"


def test_every_install_pins_torch_and_installs_numpy() -> None:
    noxfile = (ROOT / "noxfile.py").read_text()
    assert '"torch==2.13.0"' in noxfile
    assert re.search(r"BASE = \[TORCH, \"numpy\"\]", noxfile)
    for name in PACKAGES:
        project = tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())["project"]
        torch_requirements = [r for r in project["dependencies"] if re.match(r"torch\b", r)]
        assert torch_requirements == (["torch>=2.9,<2.14"] if name == "core" else []), torch_requirements


def test_products_depend_on_core_of_the_same_version_and_nothing_else_of_ours() -> None:
    core_version = tomllib.loads((ROOT / "packages/core/pyproject.toml").read_text())["project"]["version"]
    for product in ("fabric", "trainer"):
        project = tomllib.loads((ROOT / "packages" / product / "pyproject.toml").read_text())["project"]
        assert project["version"] == core_version
        ours = [r for r in project["dependencies"] if r.startswith("torchloom")]
        assert ours == [f"torchloom-core=={core_version}"]


def test_no_namespace_init_and_no_cross_imports() -> None:
    for name in PACKAGES:
        assert not (ROOT / "packages" / name / "src" / "torchloom" / "__init__.py").exists()
    forbidden = {
        "core": r"^\s*(from|import) torchloom\.(fabric|trainer)",
        "fabric": r"^\s*(from|import) torchloom\.trainer",
        "trainer": r"^\s*(from|import) torchloom\.fabric",
    }
    for name, pattern in forbidden.items():
        found = subprocess.run(
            ["grep", "-rlE", pattern, str(ROOT / "packages" / name / "src")], capture_output=True, text=True
        )
        assert found.stdout == "", f"{name} imports a product it must not: {found.stdout}"
