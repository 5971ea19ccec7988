"""The operations files stay true to the gateway: the Grafana dashboard, compose, the LB and Prometheus
configs, the Dockerfile and every gateway config under ``config/``.

The dashboard's queries are read the way Prometheus would and compared with a real scrape of
``/metrics`` from a gateway that has answered traffic: every series a panel asks for is exposed, and
every label a panel filters, groups or names in a legend is one that series carries (SPEC §7). A
renamed metric or label otherwise shows up only as an empty panel in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.support.fakes import Fault
from tests.support.metrics_spec import EXPOSED_SERIES, SPEC_SERIES

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "config" / "grafana-dashboard.json"
COMPOSE = REPO / "docker-compose.yml"
HAPROXY = REPO / "deploy" / "haproxy.cfg"
PROMETHEUS = REPO / "deploy" / "prometheus.yml"
DOCKERFILE = REPO / "Dockerfile"

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# ---------------------------------------------------------------- the dashboard, read


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query on the dashboard."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    return out


def family(name: str) -> str:
    """``reliapi_ttft_seconds_bucket`` → ``reliapi_ttft_seconds``."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in EXPOSED_SERIES:
            return name.removesuffix(suffix)
    return name


_METRIC = re.compile(r"\breliapi_[a-z0-9_]+")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_VARIABLE = re.compile(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)")


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for _, labels in _GROUPING.findall(expr) for label in labels.split(",") if label.strip()}


def matcher_labels(expr: str) -> set[str]:
    return {label for body in _MATCHERS.findall(expr) for label in _MATCHER_LABEL.findall(body)}


# ---------------------------------------------------------------- the dashboard's shape


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_and_target_variable() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    target = variables["target"]
    assert target["type"] == "query" and target["includeAll"] and target["multi"]
    assert target["query"]["query"] == "label_values(reliapi_requests_total, target)"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in d["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_no_two_panels_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_spec_series_is_on_the_dashboard() -> None:
    used = {family(name) for _, expr, _ in queries() for name in _METRIC.findall(expr)}
    assert set(SPEC_SERIES) - used == set()


def test_every_variable_a_query_uses_is_defined() -> None:
    defined = {v["name"] for v in dashboard()["templating"]["list"]} | GRAFANA_BUILTINS
    for title, expr, _ in queries():
        assert set(_VARIABLE.findall(expr)) <= defined, title


def test_every_label_a_query_names_belongs_to_its_series() -> None:
    for title, expr, legend in queries():
        families = {family(name) for name in _METRIC.findall(expr)}
        allowed = set().union(*(SPEC_SERIES[f] for f in families)) | SCRAPE_LABELS
        if "_bucket" in expr:
            allowed.add("le")
        used = grouping_labels(expr) | matcher_labels(expr)
        assert used <= allowed, f"{title}: {sorted(used - allowed)} not on {sorted(families)}"
        shown = set(_LEGEND.findall(legend))
        if shown:  # a legend can only name labels the aggregation keeps
            assert shown <= grouping_labels(expr), f"{title}: legend {sorted(shown)} vs {expr}"


# ---------------------------------------------------------------- against a real scrape

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$")


def exposed(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Names a query may use (histograms: with their suffixes) and the label names of each sample seen."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if m := _TYPE.match(line):
            names.add(m[1])
            if m[2] == "histogram":
                names.update(m[1] + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif m := _SAMPLE.match(line):
            names.add(m[1])
            labels.setdefault(m[1], set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m[2] or ""))
    return names, labels


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def test_every_series_the_dashboard_queries_is_exposed_with_those_labels(fake, gateway) -> None:
    client, _ = await gateway(f"""
server: {{default_target: up}}
targets:
  up:
    base_url: {fake.url}/v1
    provider: openai
    models: ["gpt-*"]
    cache: {{ttl_s: 60}}
  live:
    base_url: {fake.url}/v1
    provider: openai
""")
    fake.plan(Fault(), Fault(), Fault(chunks=2))
    for body, target in ((CHAT, "up"), (CHAT, "up"), ({**CHAT, "stream": True}, "live")):  # a miss, a hit, a stream
        resp = await client.post("/v1/chat/completions", json=body, headers={"X-ReliAPI-Target": target})
        assert resp.status == 200
        await resp.read()
    resp = await client.get("/metrics")
    assert resp.status == 200
    names, labels = exposed(await resp.text())

    for title, expr, _ in queries():
        missing = set(_METRIC.findall(expr)) - names
        assert not missing, f"{title}: /metrics has no {sorted(missing)}"
    # The label table above is what the gateway really writes, wherever this traffic produced a sample.
    seen = {family(name) for name in labels if name.startswith("reliapi_")}
    assert {"reliapi_requests_total", "reliapi_ttft_seconds", "reliapi_llm_tokens_total",
            "reliapi_cache_hits_total"} <= seen
    for name, label_names in labels.items():
        if not name.startswith("reliapi_"):
            continue
        expected = EXPOSED_SERIES[family(name)] | ({"le"} if name.endswith("_bucket") else set())
        assert label_names == expected, name


# ---------------------------------------------------------------- compose, LB, Prometheus, image


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_and_every_file_it_mounts_or_builds_exists() -> None:
    services = compose()["services"]
    assert {"reliapi", "reliapi-2", "lb", "redis"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
            assert (REPO / context / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = defaults(volume).split(":")[0]
            if source.startswith("."):
                assert (REPO / source).is_file(), f"{name}: {source} does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def defaults(text: str) -> str:
    """A compose value as it is without the environment: ``${VAR:-default}`` is its default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_the_lb_profile_runs_two_gateways_on_one_redis_behind_haproxy() -> None:
    services = compose()["services"]
    gateways = [s for s in services.values() if "build" in s]
    assert len(gateways) == 2
    for service in gateways:
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert "./config/production.yaml:/app/config.yaml:ro" in [defaults(v) for v in service["volumes"]]
        assert int(service["stop_grace_period"].removesuffix("s")) > 30  # > server.shutdown_grace_s
    assert services["reliapi-2"]["profiles"] == ["lb"] and services["lb"]["profiles"] == ["lb"]
    cfg = HAPROXY.read_text()
    servers = re.findall(r"^\s*server\s+\S+\s+([\w.-]+):(\d+)", cfg, re.M)
    assert sorted(servers) == [("reliapi", "8000"), ("reliapi-2", "8000")]
    assert re.search(r"^\s*option httpchk GET /readyz\b", cfg, re.M)


def test_prometheus_scrapes_each_gateway_directly() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    gateways = {name for name, s in compose()["services"].items() if "build" in s}
    assert targets == {f"{name}:8000" for name in gateways}
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_the_image_runs_unprivileged_listens_everywhere_and_bakes_in_no_secret() -> None:
    text = DOCKERFILE.read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    cmd = re.findall(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    assert cmd, "CMD must be in exec form, so the gateway is PID 1 and receives SIGTERM"
    assert json.loads(cmd[-1]) == ["python", "-m", "gateway", "--host", "0.0.0.0"]
    healthcheck = text[text.index("HEALTHCHECK"):].split("\n\n")[0]
    assert '"--healthcheck"' in healthcheck  # /healthz on the port the server listens on (tests/test_cli.py)
    env = " ".join(re.findall(r"^ENV\s+((?:.*\\\n)*.*)", text, re.M))
    assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", env, re.I)


# ---------------------------------------------------------------- gateway configs

GATEWAY_CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml"))


def test_there_is_a_production_config() -> None:
    assert "production.yaml" in GATEWAY_CONFIGS and "gateway.yaml" in GATEWAY_CONFIGS


@pytest.mark.parametrize("name", GATEWAY_CONFIGS)
def test_every_gateway_config_passes_check(cli, name: str) -> None:
    result = cli.run("--check", "--config", str(REPO / "config" / name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
