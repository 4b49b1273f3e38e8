"""A/B: which arm a request goes to, and which upstream model an arm means right now.

Assignment is sticky: a hash of (experiment salt, user) picks a point in [0, 1) that falls into one arm's share
of the weights, so a user keeps their arm while the weights and salt stay the same. An arm whose target is not
available (its alias is not set) gives its share to the others, in proportion.

Targets follow the registry: an arm on `alias: champion` points at `<registered model>-v<version>` of the
version the alias names now; `Targets.move` repoints it when the alias watcher sees a move (after the upstream
has the adapter loaded), without a restart.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from fibreflow.serving.config import Arm, Experiment, served_name


@dataclass(frozen=True)
class Target:
    """Where an arm's requests go: an upstream, the model name there, and the registry version (if any)."""

    upstream: str
    model: str
    version: str | None


def unit_hash(salt: str, user: str) -> float:
    """A stable point in [0, 1) for this user in this experiment."""
    digest = hashlib.blake2b(f"{salt}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose(exp: Experiment, user: str, available: set[str]) -> Arm | None:
    """The arm for `user` among the available ones (shadow arm excluded), weights renormalised."""
    arms = [a for a in exp.arms if a.name in available and a.name != exp.shadow and a.weight > 0]
    total = sum(a.weight for a in arms)
    if not arms:
        return None
    point, acc = unit_hash(exp.salt, user) * total, 0.0
    for arm in arms:
        acc += arm.weight
        if point < acc:
            return arm
    return arms[-1]


class Targets:
    """arm name -> current Target, per experiment; alias arms follow the registry."""

    def __init__(self, registered_model: str, experiments: list[Experiment]) -> None:
        self.registered_model = registered_model
        self._lock = threading.Lock()
        self._targets: dict[tuple[str, str], Target] = {}
        for exp in experiments:
            for arm in exp.arms:
                if arm.model is not None:
                    self._targets[(exp.model, arm.name)] = Target(arm.upstream, arm.model, None)
                elif arm.version is not None:
                    self._targets[(exp.model, arm.name)] = self._versioned(arm, str(arm.version))
        self.experiments = {e.model: e for e in experiments}

    def put(self, exp: Experiment, alias_versions: dict[str, str | None]) -> None:
        """Add or replace an experiment (admin API); alias arms point at the aliases' current versions."""
        with self._lock:
            self.remove(exp.model)
            for arm in exp.arms:
                version = str(arm.version) if arm.version is not None else alias_versions.get(arm.alias or "")
                if arm.model is not None:
                    self._targets[(exp.model, arm.name)] = Target(arm.upstream, arm.model, None)
                elif version is not None:
                    self._targets[(exp.model, arm.name)] = self._versioned(arm, version)
            self.experiments = self.experiments | {exp.model: exp}

    def remove(self, model: str) -> None:
        for key in [k for k in self._targets if k[0] == model]:
            del self._targets[key]
        self.experiments = {m: e for m, e in self.experiments.items() if m != model}

    def _versioned(self, arm: Arm, version: str) -> Target:
        return Target(arm.upstream, served_name(self.registered_model, version), version)

    def get(self, model: str, arm: str) -> Target | None:
        return self._targets.get((model, arm))

    def available(self, model: str) -> set[str]:
        return {arm for (m, arm) in self._targets if m == model}

    def alias_arms(self, alias: str) -> list[tuple[str, Arm]]:
        return [(e.model, a) for e in self.experiments.values() for a in e.arms if a.alias == alias]

    def move(self, alias: str, version: str | None) -> None:
        """Point every arm on `alias` at `version` (None: the alias was removed, the arm has no target)."""
        with self._lock:
            for model, arm in self.alias_arms(alias):
                if version is None:
                    self._targets.pop((model, arm.name), None)
                else:
                    self._targets[(model, arm.name)] = self._versioned(arm, version)

    def versions(self) -> dict[str, dict[str, str | None]]:
        """experiment model -> arm -> served model (for /v1/models and the admin view)."""
        out: dict[str, dict[str, str | None]] = {}
        for (model, arm), t in sorted(self._targets.items()):
            out.setdefault(model, {})[arm] = t.model
        return out
