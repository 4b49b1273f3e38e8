"""The package layout and the CLI: `datasets/` never shadows Hugging Face datasets; --help everywhere."""

import subprocess
import sys
from pathlib import Path

import pytest
from fibreflow.core.cli import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def test_hf_datasets_is_not_shadowed_from_repo_root() -> None:
    code = "import datasets, fibreflow.datasets.build; datasets.load_dataset; print(datasets.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout


def test_datasets_folder_has_no_init() -> None:
    assert not (ROOT / "datasets" / "__init__.py").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["db"],
        ["db", "up"],
        ["db", "down"],
        ["db", "status"],
        ["db", "migrate"],
        ["db", "seed"],
        ["data"],
        ["data", "build"],
        ["embed"],
        ["main"],
    ],
)
def test_help_on_every_command(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_cli_reports_config_errors_without_traceback() -> None:
    result = CliRunner().invoke(app, ["db", "seed", "--set", "scael=2"])
    assert result.exit_code == 2
    assert "scael" in result.output and "Traceback" not in result.output
