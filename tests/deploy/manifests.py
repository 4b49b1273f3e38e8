"""Helpers of the deploy tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import re
from typing import Any


def overrides(command: list[str]) -> dict[str, Any]:
    """The `--set=key=value` arguments of a command line as config overrides (compose's ${VAR:-default} resolved
    to its default)."""
    from fibreflow.core.config import parse_overrides

    interpolated = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in command]  # compose's defaults
    return parse_overrides([a.removeprefix("--set=") for a in interpolated if a.startswith("--set=")])
