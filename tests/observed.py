"""What deploy/ asks Prometheus for: the rules' and the dashboard's PromQL, the metric names they select, and the
sample names a real /metrics exposition carries (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fibreflow.json"
GRAFANA_VARS = {"$__rate_interval": "5m", "$arm": ".*"}  # what Grafana puts in before Prometheus sees a query


def rules() -> list[dict[str, Any]]:
    tree = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "fibreflow.yml").read_text())
    return [r for g in tree["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def promql(expr: str) -> Any:
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return promql_parser.parse(expr)


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (Grafana's label_values(metric, label) included)."""
    import promql_parser

    names: set[str] = set()
    if m := re.fullmatch(r"label_values\((\w+), *\w+\)", expr):
        return {m.group(1)}

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql(expr), visit)
    return names


def exported(text: str) -> set[str]:
    """The sample names an exposition can carry: a histogram's _bucket/_sum/_count, a counter's _total."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "info": ("_info",)}  # fmt: skip
    return {f.name + s for f in text_string_to_metric_families(text) for s in suffixes.get(f.type, ("",))}


def used_names() -> set[str]:
    """Every metric the alert rules and the dashboard select."""
    names: set[str] = set()
    for expr in dashboard_exprs() + [r["expr"] for r in rules()]:
        names |= metric_names(expr)
    return names
