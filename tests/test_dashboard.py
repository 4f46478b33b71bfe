"""The Grafana dashboard asks only for metrics the relay exposes, and shows every one of them.

A dashboard that queries a misspelled or renamed metric shows "No data" exactly when someone needs it;
nothing else would notice, so this test holds the dashboard to a written contract of metric names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "rr-relay-dashboard.json"

#: The contract: every metric family the relay exposes on /metrics (histograms by their base name).
#: consumer/metrics.py must expose exactly these names; a second test will check them against its registry.
METRICS = frozenset(
    {
        "rr_records_consumed_total",
        "rr_records_settled_total",
        "rr_calls_total",
        "rr_requests_total",
        "rr_retries_total",
        "rr_dead_lettered_total",
        "rr_in_flight_records",
        "rr_batch_events",
        "rr_request_duration_seconds",
        "rr_breaker_open",
        "rr_consumer_lag",
        "rr_committed_offset_age_seconds",
        "rr_partitions_assigned",
        "rr_build_info",
    }
)
HISTOGRAMS = frozenset({"rr_batch_events", "rr_request_duration_seconds"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once labels, ranges, strings, groupings,
    function names and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # string literals (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        followed_by = text[match.end() :].lstrip()[:1]
        preceded_by = text[: match.start()].rstrip()[-1:]
        if followed_by == "(" or name in _PROMQL_KEYWORDS or preceded_by == "$":
            continue  # a function, a keyword, or a Grafana variable
        names.add(name)
    return names


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and stem in HISTOGRAMS:
            return stem
    return name


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # panels inside a collapsed row


def panel_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def variable_metrics(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query)
        assert match, f"variable {variable['name']}: only label_values(metric, label) is checked: {query}"
        yield variable["name"], match.group(1)


def test_the_expression_parser_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, method) "
        '(rate(rr_request_duration_seconds_bucket{instance=~"$i", method="view"}[$__rate_interval]))) '
        "/ on (method) group_left rr_other or vector(0)"
    )
    assert metric_names(expr) == {"rr_request_duration_seconds_bucket", "rr_other"}
    assert base_name("rr_request_duration_seconds_bucket") == "rr_request_duration_seconds"
    assert base_name("rr_calls_total") == "rr_calls_total"


def test_the_dashboard_is_importable_json_with_a_prometheus_input(dashboard: dict[str, Any]) -> None:
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"]
    assert dashboard["title"]


def test_every_panel_queries_the_prometheus_input_with_unique_ids(dashboard: dict[str, Any]) -> None:
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"{panel['title']} queries nothing"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"])


def test_every_metric_a_panel_or_variable_uses_is_one_the_relay_exposes(dashboard: dict[str, Any]) -> None:
    used = [(title, name) for title, expr in panel_expressions(dashboard) for name in metric_names(expr)]
    used += list(variable_metrics(dashboard))
    unknown = sorted({(title, name) for title, name in used if base_name(name) not in METRICS})
    assert not unknown, f"metrics the relay does not expose: {unknown}"


def test_every_exposed_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    shown = {base_name(name) for _, expr in panel_expressions(dashboard) for name in metric_names(expr)}
    assert sorted(METRICS - shown) == []


def test_histogram_quantiles_read_buckets_and_group_by_le(dashboard: dict[str, Any]) -> None:
    quantiles = [(t, e) for t, e in panel_expressions(dashboard) if "histogram_quantile" in e]
    assert quantiles, "the latency and batch size panels use histogram_quantile"
    for title, expr in quantiles:
        assert "_bucket" in expr, title
        assert re.search(r"by \([^)]*\ble\b", expr), f"{title}: a quantile needs the le label kept"


@pytest.mark.parametrize(
    ("title", "needs"),
    [
        ("Records consumed and settled", ["rr_records_consumed_total", "rr_records_settled_total"]),
        ("Calls by method and outcome", ["method, outcome"]),
        ("Dead-lettered by stage and reason", ["stage, reason"]),
        ("Records in flight", ["rr_in_flight_records"]),
        ("Consumer lag per partition", ["topic, partition"]),
        ("Total consumer lag per topic", ["sum by (topic)"]),
        ("Committed offset age", ["rr_committed_offset_age_seconds"]),
        ("Request latency p50 / p99", ["histogram_quantile(0.5,", "histogram_quantile(0.99,"]),
        (
            "visitorEvents batch size",
            ["rr_batch_events_bucket", "rr_batch_events_sum", "rr_batch_events_count"],
        ),
        ("Circuit breaker per shop", ["by (shop)", "rr_breaker_open"]),
        ("Retries per shop", ["rr_retries_total"]),
    ],
)
def test_the_operator_questions_each_have_a_panel(
    dashboard: dict[str, Any], title: str, needs: list[str]
) -> None:
    expressions = [expr for panel_title, expr in panel_expressions(dashboard) if panel_title == title]
    assert expressions, f"no panel titled {title!r}"
    joined = "\n".join(expressions)
    for fragment in needs:
        assert fragment in joined, f"{title}: expected {fragment!r}"


def test_the_contract_is_exactly_what_the_relays_metrics_registry_exposes() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from consumer.metrics import RelayMetrics

    metrics = RelayMetrics()
    metrics.observe_request("demo", "visitorEvents", 200, 0.01, 10)  # histograms appear once observed
    exposed = {
        family.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    # The text format names counters without their _total suffix.
    assert {name.removesuffix("_total") for name in METRICS} == exposed
