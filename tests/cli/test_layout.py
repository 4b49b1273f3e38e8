"""The package layout and the CLI: `datasets/` never shadows Hugging Face datasets, imports point down the
stages, --help works on every registered command."""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from fibreflow.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def test_hf_datasets_is_not_shadowed_from_repo_root() -> None:
    code = "import datasets, fibreflow.datasets.build; datasets.load_dataset; print(datasets.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout


def test_datasets_folder_has_no_init() -> None:
    assert not (ROOT / "datasets" / "__init__.py").exists()


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in getattr(group, "commands", {}).items():
        out += _commands(cmd, (*prefix, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) or "fibreflow" for c in COMMANDS])
def test_help_on_every_registered_command(args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


LAYERS = (
    "core",
    "datasets",
    "training",
    "eval",
    "registry",
    "serving",
    "monitor",
    "cli",
)  # each may import those before it


def test_imports_point_down_the_stages() -> None:
    """No module imports a later stage, not even inside a function: core <- datasets <- training <- eval <-
    registry <- serving <- monitor <- cli."""
    upward = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "fibreflow" and len(parts) > 1 and LAYERS.index(parts[1]) > rank:
                        upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert upward == []
    assert len(COMMANDS) > 20  # the walk found the registered commands, not just the root


def test_cli_reports_config_errors_without_traceback() -> None:
    result = CliRunner().invoke(app, ["db", "seed", "--set", "scael=2"])
    assert result.exit_code == 2
    assert "scael" in result.output and "Traceback" not in result.output
