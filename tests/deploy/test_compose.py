"""deploy/compose.yaml and the Dockerfiles, checked without a Docker engine (none runs on these machines): the
compose specification's JSON schema, then what the schema cannot see: references between services, files that
must exist, secrets never written in, only the router and Grafana published beyond loopback, Prometheus scraping
what runs, and the router's and monitor's command-line overrides valid for the real configs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from manifests import overrides
from observed import DEPLOY

ROOT = DEPLOY.parent
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.I)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    import importlib.resources

    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = compose | {"services": compose["services"] | {"router": compose["services"]["router"] | {"ports": 8000}}}
    assert list(validator.iter_errors(broken)), "the schema check can fail"


def test_the_seed_hosts_services_are_all_there(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "mlflow", "vllm", "vllm-fallback", "router", "monitor", "prometheus",
                 "alertmanager", "grafana", "dcgm-exporter"):  # fmt: skip
        assert name in services, name
    assert "pgvector" in services["postgres"]["image"]
    assert any("--enable-lora" in a for a in services["vllm"]["command"])
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_references_between_services_and_files_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], f"{name} uses undeclared secret {secret}"
    for secret in compose["secrets"].values():  # files the operator writes: never in git
        assert secret["file"].startswith("./secrets/")
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text()


def test_secrets_come_from_the_environment_or_files(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), f"{name}: {key} is written in"
    example = (DEPLOY / ".env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, re.M))
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used - documented == set(), "variables compose reads that .env.example does not explain"
    for var in ("POSTGRES_PASSWORD", "FIBREFLOW_UPSTREAM_KEY", "FIBREFLOW_QA_KEY"):
        assert re.search(rf"^{var}=$", example, re.M), f"{var} must be empty in the example"


def test_only_the_router_and_grafana_are_published_beyond_loopback(compose: dict[str, Any]) -> None:
    public = set()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                public.add(name)
    assert public == {"router", "grafana"}
    assert "ports" not in compose["services"]["vllm"] and "ports" not in compose["services"]["postgres"]


def test_prometheus_scrapes_what_compose_runs(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    services = compose["services"]
    for target in targets - {"localhost:9090"}:
        host = target.split(":")[0]
        assert host in services, f"Prometheus scrapes {target}: no such service"
    flags = " ".join(services["router"]["command"] + services["monitor"]["command"])
    assert "router.metrics_listen=0.0.0.0:9464" in flags and "router:9464" in targets
    assert "schedule.metrics_listen=0.0.0.0:9465" in flags and "monitor:9465" in targets


def test_the_router_and_monitor_commands_are_valid_configs(compose: dict[str, Any]) -> None:
    """The --set overrides in compose load into the real serving and monitoring configs."""
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.serving.config import load_serving_config

    router = load_serving_config(overrides(compose["services"]["router"]["command"])).router
    assert router.host == "0.0.0.0" and router.metrics_listen == "0.0.0.0:9464"
    assert router.upstreams["primary"].url == "http://vllm:8000/v1"
    assert router.fallback.upstream == "fallback" and router.upstreams["fallback"].url.startswith(
        "http://vllm-fallback"
    )
    assert router.embeddings.upstream == "embeddings" and "embeddings" in compose["services"]
    monitor = load_monitoring_config(overrides(compose["services"]["monitor"]["command"]))
    assert monitor.router.base_url == "http://router:8000/v1" and monitor.alert.webhook_url is None


def test_the_dockerfiles_copy_every_stage_and_run_unprivileged() -> None:
    import tomllib

    stages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for name in ("router", "trainer"):
        text = (DEPLOY / "docker" / f"{name}.Dockerfile").read_text()
        copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
        assert stages <= copied, f"{name}.Dockerfile leaves out {stages - copied}"
        for source in re.findall(r"^COPY ((?:\S+ )+)\S+$", text, re.M):
            for path in source.split():
                assert (ROOT / path).exists(), f"{name}.Dockerfile copies missing {path}"
        assert re.search(r"^USER 10001$", text, re.M)
        assert "pip install -c constraints.txt" in text  # the tested set
    router = (DEPLOY / "docker" / "router.Dockerfile").read_text()
    assert '".[serve]"' in router and "torch" not in router.replace("no torch", "")  # the router image stays small
    assert '".[all]"' in (DEPLOY / "docker" / "trainer.Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", "deploy/secrets"} <= set(ignored)
