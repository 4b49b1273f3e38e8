"""The main job on embedded defaults: database -> migrations -> demo data -> datasets -> embeddings.

Later stages (fine-tune, evaluate, register, promote) extend this same function.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fibreflow.core.db import migrate, open_db
from fibreflow.core.seed import load_seed_config, seed


def main(scale: int | None = None, *, progress: bool = True) -> dict[str, Any]:
    from fibreflow.datasets import build, embed

    steps: dict[str, Any] = {}
    t0 = time.perf_counter()
    seed_cfg = load_seed_config({"scale": scale} if scale is not None else None)
    with open_db() as conn:
        steps["migrate"] = [f"{m.version:04d}_{m.name}" for m in migrate(conn)] or "up to date"
        # Reseeding is skipped when the data already came from this exact seed config.
        current = conn.execute("SELECT value FROM fibreflow_meta WHERE key = 'data_source'").fetchone()
        wanted = {"source": "demo-seed", **json.loads(seed_cfg.model_dump_json())}
        if current and all(current[0].get(k) == v for k, v in wanted.items()):
            steps["seed"] = {"reused": True, "rows": current[0]["rows"]}
        else:
            steps["seed"] = {"reused": False, "rows": seed(conn, seed_cfg, progress=progress)}
    steps["datasets"] = build.main(progress=progress)
    steps["embed"] = embed.main(progress=progress)
    steps["wall_s"] = round(time.perf_counter() - t0, 1)
    return steps
