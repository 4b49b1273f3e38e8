"""The dataset manifest: what a built dataset version holds and where it came from. Written by the build into
`<version>/manifest.json` and read back only through this module (training, evaluation, MLflow logging)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fibreflow.core.config import Strict
from fibreflow.core.errors import DatasetBuildError
from pydantic import ValidationError

FILE = "manifest.json"


class SplitFile(Strict):
    """One file of the version: its rows and the sha256 of its content."""

    file: str
    rows: int
    sha256: str


class DatabaseSnapshot(Strict):
    """The one REPEATABLE READ snapshot every row was read from."""

    url: str  # password redacted
    server_version: str
    schema_version: int | None
    snapshot: str
    table_rows: dict[str, int]
    data_source: dict[str, Any] | None  # fibreflow_meta's data_source: the demo seed's parameters, or a sync's


class DatasetManifest(Strict):
    version: str  # sha256 of the content and the build config: same database state + config = same version
    datasets: dict[str, dict[str, SplitFile]]  # dataset -> split -> Parquet file
    accuracy_test_set: SplitFile
    grounded_qa_test_projects: list[str]
    build_config: dict[str, Any]
    source_queries: dict[str, str]
    database: DatabaseSnapshot

    def split(self, dataset: str, split: str) -> SplitFile:
        found = self.datasets.get(dataset, {}).get(split)
        if found is None:
            raise DatasetBuildError(f"dataset {self.version} has no {dataset} {split} split: rebuild it") from None
        return found


def write_manifest(folder: Path, manifest: DatasetManifest) -> None:
    (folder / FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False))


def read_manifest(folder: Path) -> DatasetManifest:
    path = folder / FILE
    if not path.is_file():
        raise DatasetBuildError(f"{folder}: no {FILE}, not a built dataset version (`fibreflow data build`)")
    try:
        return DatasetManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise DatasetBuildError(
            f"{path}: not a manifest this release reads ({exc.errors()[0]['msg']}); rebuild it"
        ) from None
