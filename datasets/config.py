"""configs/data.yaml as a typed config: where datasets go, the system prompt, and what each dataset holds (light: the
router reads the system prompt without the dataset stage's Parquet stack)."""

from __future__ import annotations

from typing import Any

from fibreflow.core.config import Strict, load_config
from fibreflow.datasets import assistant as asst
from fibreflow.datasets import grounded_qa as qa
from fibreflow.datasets import terminology as term


class DataConfig(Strict):
    output_dir: str
    cursor_rows: int
    system_prompt: str
    terminology: term.TerminologyConfig
    grounded_qa: qa.GroundedQAConfig
    assistant: asst.AssistantConfig

    def content_config(self) -> dict[str, Any]:
        """What decides the content (and so the version): everything but where and how fast."""
        return self.model_dump(mode="json", exclude={"output_dir", "cursor_rows"})


def load_data_config(overrides: dict[str, Any] | None = None) -> DataConfig:
    return load_config(DataConfig, "data", overrides)
