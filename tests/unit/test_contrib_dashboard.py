"""contrib/: every metric and label the Grafana dashboard asks for is one the gateway exports,
and the Prometheus example scrapes the internal listener the way the gateway serves it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.notary.certificate import certificate_paths
from gateway.policy.engine import PolicyMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "matrix-gateway.json"
SCRAPE_CONFIG = ROOT / "contrib" / "prometheus" / "prometheus.yml"

#: Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def exercised_metrics_text() -> str:
    """What a real registry serves after every metric the dashboard can show has been given a
    value (labelled metrics appear only then)."""
    metrics = Metrics()
    policy = PolicyMetrics(registry=metrics.registry)
    metrics.observe_request("passthrough", 200, 0.01)
    metrics.upstream_error("connect_error")
    metrics.worker_starts.inc()
    metrics.legacy_invites.labels(version="v2").inc()
    metrics.v3_invites.labels(outcome="delivered").inc()
    metrics.delegation_entries_removed.inc()
    metrics.outbound_requests.labels("send", "remote", "2xx").inc()
    metrics.outbound_duration.labels("send", "remote").observe(0.01)
    metrics.outbound_invites.labels(version="v3").inc()
    metrics.outbound_invite_fallbacks.inc()
    policy.decisions.labels("p", "invite", "allow", "enforce").inc()
    policy.failures.labels("p", "invite", "timeout").inc()
    policy.outcomes.labels("invite", "allow").inc()
    policy.duration.labels("p", "invite").observe(0.001)
    policy.reloads.labels("ok").inc()
    return metrics.render().decode()


def exported(text: str) -> dict[str, set[str]]:
    """Sample name -> label names."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(params=["one worker", "several workers"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, set[str]]:
    """With several workers the values live in files and are added up when served, which
    the client library only does in a process started with the directory set."""
    if request.param == "one worker":
        assert not os.environ.get(MULTIPROC_ENV)
        return exported(exercised_metrics_text())
    code = (
        "from tests.unit.test_contrib_dashboard import exercised_metrics_text as t; "
        "print(t(), end='')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, MULTIPROC_ENV: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert list(tmp_path.iterdir()), "the subprocess did not write multiprocess files"
    return exported(result.stdout)


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and node.get("type") != "datasource":
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. Small, for this dashboard's PromQL:
    selectors, ranges, aggregations with by/without, functions, arithmetic."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{\w+\}|\$\w+", "", text)
    # Grafana's label_values(metric{...}, label): the second argument is a label.
    labels = set(re.findall(r"label_values\(.*,\s*(\w+)\s*\)", text))
    text = re.sub(r"(label_values\(.*?),\s*\w+\s*\)", r"\1)", text)
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    metric_names = {
        m.group(0)
        for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
        if not re.match(r"\s*\(", text[m.end() :]) and m.group(0).lower() not in _KEYWORDS
    }
    return metric_names, labels


def test_the_parser_finds_metrics_and_labels() -> None:
    assert parse(
        'histogram_quantile(0.95, sum by (le, route) (rate(x_bucket{job=~"$job"}[5m]))) / '
        'sum without (a) (y_total{status=~"5.."}) * 60'
    ) == ({"x_bucket", "y_total"}, {"le", "route", "job", "status", "a"})
    assert parse('label_values(m{job=~"$job"}, instance)') == ({"m"}, {"job", "instance"})


def test_every_metric_and_label_in_the_dashboard_is_exported(served: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names, labels = parse(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - served.keys()
        assert not unknown, f"{expr!r} uses metrics the gateway does not export: {unknown}"
        known_labels = SCRAPE_LABELS.union(*(served[n] for n in names))
        assert labels <= known_labels, f"{expr!r}: unknown labels {labels - known_labels}"
        used |= names
    # The panels the dashboard is for.
    for family in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_errors_total",
        "gateway_v3_invites_total",
        "gateway_legacy_invites_total",
        "gateway_delegation_entries_removed_total",
        "gateway_policy_decisions_total",
    ):
        assert family in used, family


def test_the_dashboard_panels_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_the_scrape_example_matches_the_internal_listener(tmp_path: Path) -> None:
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    [job] = scrape["scrape_configs"]
    defaults = parse_config({"server": {"server_name": "hs.test"}}, base_dir=tmp_path)
    assert job["metrics_path"] == "/metrics"
    [target] = job["static_configs"][0]["targets"]
    assert target == str(defaults.internal.bind)
    # With the notary on the listener is HTTPS with the gateway's own certificate, which is
    # where the example points (the container image keeps notary.state_dir on its volume).
    assert job["scheme"] == "https"
    ca_file = Path(job["tls_config"]["ca_file"])
    assert ca_file.name == certificate_paths(Path("state"))[0].name
    assert ca_file.parent == Path("/var/lib/matrix-gateway/state")
