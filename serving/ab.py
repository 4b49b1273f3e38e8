"""Which upstream model each experiment's arms mean right now.

Targets follow the registry: an arm on `alias: champion` points at `<registered model>-v<version>` of the
version the alias names now; `Targets.move` repoints it when the alias watcher sees a move (after the upstream
has the adapter loaded), without a restart. Experiments can be added, replaced and removed at run time (the admin
API); the arm a request goes to is decided in `routing.py`.
"""

from __future__ import annotations

import threading

from fibreflow.serving.config import Arm, Experiment, served_name
from fibreflow.serving.routing import Target


class Targets:
    """arm name -> current Target, per experiment; alias arms follow the registry."""

    def __init__(self, registered_model: str, experiments: list[Experiment]) -> None:
        self.registered_model = registered_model
        self._lock = threading.Lock()
        self._targets: dict[str, dict[str, Target]] = {}
        self.experiments: dict[str, Experiment] = {}
        self.aliases: dict[str, str | None] = {}  # alias -> the version it names, as last seen
        for exp in experiments:
            self.put(exp)

    def put(self, exp: Experiment) -> None:
        """Add or replace an experiment; alias arms point at the aliases' current versions."""
        arms: dict[str, Target] = {}
        for arm in exp.arms:
            if arm.model is not None:
                arms[arm.name] = Target(arm.upstream, arm.model, None)
            elif version := str(arm.version) if arm.version is not None else self.aliases.get(arm.alias or ""):
                arms[arm.name] = self._versioned(arm, version)
        with self._lock:
            self._targets = self._targets | {exp.model: arms}
            self.experiments = self.experiments | {exp.model: exp}

    def remove(self, model: str) -> None:
        with self._lock:
            self._targets = {m: t for m, t in self._targets.items() if m != model}
            self.experiments = {m: e for m, e in self.experiments.items() if m != model}

    def _versioned(self, arm: Arm, version: str) -> Target:
        return Target(arm.upstream, served_name(self.registered_model, version), version)

    def of(self, model: str) -> dict[str, Target]:
        """arm -> target of an experiment (arms without a target are absent)."""
        return self._targets.get(model, {})

    def alias_arms(self, alias: str) -> list[tuple[str, Arm]]:
        return [(e.model, a) for e in self.experiments.values() for a in e.arms if a.alias == alias]

    def move(self, alias: str, version: str | None) -> None:
        """Point every arm on `alias` at `version` (None: the alias was removed, the arm has no target)."""
        with self._lock:
            self.aliases = self.aliases | {alias: version}
            targets = {m: dict(t) for m, t in self._targets.items()}
            for model, arm in self.alias_arms(alias):
                if version is None:
                    targets[model].pop(arm.name, None)
                else:
                    targets[model][arm.name] = self._versioned(arm, version)
            self._targets = targets

    def versions(self) -> dict[str, dict[str, str | None]]:
        """experiment model -> arm -> served model (for /v1/models and the admin view)."""
        return {m: {arm: t.model for arm, t in sorted(arms.items())} for m, arms in sorted(self._targets.items())}
