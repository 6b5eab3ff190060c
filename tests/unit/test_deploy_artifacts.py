"""The deployment artifacts, checked offline: the Helm chart (rendered with helm-python-sdk),
the kustomize manifests under deploy/, the Prometheus rules and scrape config, the Grafana
dashboard and the Dockerfile.

Rendered and plain manifests are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail). Prometheus Operator objects have no
schema there, so they are checked structurally. The linters (yamllint, hadolint, promtool)
run as the CI would run them, and a missing linter is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from gateway.metrics import Metrics
from gateway.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tokengate"
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PROMTOOL = "/usr/bin/promtool"

# The chart's floor (Chart.yaml kubeVersion) and the newest schemas available; the
# sidecar example uses the preStop sleep action, on by default since 1.30.
CHART_KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
DEPLOY_KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
OPERATOR_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
TMP_MOUNT = "/tmp"  # noqa: S108 - a mount path in a pod spec, not a file this test writes

# What a dashboard or an alert may query: what the gateway exports, read from its own
# registry. A metric added there must also get a dashboard panel
# (test_dashboard_queries_only_known_metrics); there is no hand-kept copy to go stale.
KNOWN_METRICS = frozenset(
    name
    for name in re.findall(
        r"^# TYPE (tokengate_\S+) ", Metrics().render().decode(), flags=re.MULTILINE
    )
    if not name.endswith("_created")  # prometheus-client's creation stamps, not metrics
)

# Files under deploy/ that are not Kubernetes objects; everything else must be one.
NOT_KUBERNETES = frozenset(
    {
        "grafana/tokengate-dashboard.json",
        "prometheus/rules.yml",
        "prometheus/rules.test.yml",
        "prometheus/scrape-config.yaml",
        "sidecar/tokengate.yaml",  # tokengate's own config, fed to a configMapGenerator
    }
)

ALL_FLAGS = {
    "secret": {"data": {"client_secret": "s3cr3t"}},
    "config": {
        "oidc": {"client_secret_file": "/etc/tokengate/secrets/client_secret"},
        "limits": {"shutdown_delay_s": 10, "shutdown_grace_s": 42.5},
    },
    "autoscaling": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    },
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
        ],
        "egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}],
    },
    "env": [
        {
            "name": "TOKENGATE_SESSION__REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "url"}},
        }
    ],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "tokengate"}},
        }
    ],
}
SIDECAR = {
    "mode": "sidecar",
    "secret": {"existingSecret": "shop-oidc"},
    "metrics": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "sidecar": {"podSelector": {"app.kubernetes.io/name": "shop"}},
}
SCENARIOS = {"default": {}, "all_flags": ALL_FLAGS, "sidecar": SIDECAR}


# --- helpers -------------------------------------------------------------------------


def render(values: dict[str, Any], chart_dir: Path = CHART) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values`` (NOTES.txt left out)."""
    with helm_python.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name="rel", namespace="shop")
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str = "tokengate") -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def check_operator_object(doc: dict[str, Any]) -> None:
    """The fields Prometheus Operator needs, for the kinds kubernetes-validate lacks."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    if doc["kind"] == "PrometheusRule":
        for group in spec["groups"]:
            assert group["name"]
            for rule in group["rules"]:
                assert {"alert", "expr", "labels", "annotations"} <= rule.keys()
                assert rule["labels"]["severity"] in {"warning", "critical"}
        return
    assert spec["selector"]["matchLabels"], "an empty selector would scrape everything"
    endpoints = spec["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
    for endpoint in endpoints:
        assert isinstance(endpoint["port"], str), "scrape a named port"
        assert endpoint["path"] == "/metrics"


def validate_kubernetes(doc: dict[str, Any], versions: tuple[str, ...]) -> None:
    if doc["kind"] in OPERATOR_KINDS:  # CRDs: no schema in kubernetes-validate
        check_operator_object(doc)
        return
    for version in versions:
        kubernetes_validate.validate(doc, version, strict=True)


def settings_from_yaml(text: str, tmp_path: Path) -> Any:
    """Parse a tokengate config with the real model; `*_file` keys point at stand-ins."""
    data = yaml.safe_load(text)

    def stand_in(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key.endswith("_file") and isinstance(value, str):
                    path = tmp_path / Path(value).name
                    path.write_text("stand-in-secret\n", encoding="utf-8")
                    value = str(path)
                out[key] = stand_in(value)
            return out
        if isinstance(node, list):
            return [stand_in(item) for item in node]
        return node

    return parse_settings(stand_in(data))


def run_tool(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: selectors (`name{`, `name[`) and tokengate_*."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
    names |= set(re.findall(r"\btokengate_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def dashboard_exprs(node: Any) -> Iterator[str]:
    """Every query in a dashboard: panel targets (rows included) and template variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


@pytest.fixture(autouse=True)
def _no_tokengate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # parse_settings applies TOKENGATE_* variables; the files alone must be valid.
    for name in list(os.environ):
        if name.startswith("TOKENGATE_"):
            monkeypatch.delenv(name)


# --- the Helm chart ------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_renders_valid_kubernetes_objects(scenario: str) -> None:
    docs = render(SCENARIOS[scenario])
    assert docs
    for doc in docs:
        validate_kubernetes(doc, CHART_KUBE_VERSIONS)


@pytest.mark.parametrize(
    ("scenario", "kinds"),
    [
        (
            "default",
            {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"},
        ),
        (
            "all_flags",
            {
                "ConfigMap",
                "Deployment",
                "HorizontalPodAutoscaler",
                "NetworkPolicy",
                "PodDisruptionBudget",
                "PodMonitor",
                "PrometheusRule",
                "Secret",
                "Service",
                "ServiceAccount",
                "ServiceMonitor",
            },
        ),
        # Sidecar: no workload of ours, only what the application's pods mount and scrape.
        ("sidecar", {"ConfigMap", "PodMonitor", "PrometheusRule"}),
    ],
)
def test_each_mode_renders_its_kinds(scenario: str, kinds: set[str]) -> None:
    assert {doc["kind"] for doc in render(SCENARIOS[scenario])} == kinds


def test_deployment_is_locked_down() -> None:
    pod = only(render({}), "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    tg = container(pod)
    ctx = tg["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 10001  # the image's USER
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs a writable /tmp, from an emptyDir.
    tmp = next(m for m in tg["volumeMounts"] if m["mountPath"] == TMP_MOUNT)
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert all(m.get("readOnly") for m in tg["volumeMounts"] if m["mountPath"] != TMP_MOUNT)
    assert tg["resources"]["requests"]
    assert tg["resources"]["limits"]["memory"]
    assert tg["args"] == ["run", "--config", "/etc/tokengate/tokengate.yaml"]


def test_probes_ask_the_admin_port() -> None:
    tg = container(only(render({}), "Deployment")["spec"]["template"]["spec"])
    ports = {p["name"]: p["containerPort"] for p in tg["ports"]}
    assert ports == {"tg-http": 8080, "tg-admin": 9090}
    assert tg["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "tg-admin"}
    assert tg["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "tg-admin"}
    assert tg["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "tg-admin"}


def test_ports_follow_tokengate_config() -> None:
    docs = render({"config": {"listen": {"port": 8443}, "admin": {"port": 9443}}})
    tg = container(only(docs, "Deployment")["spec"]["template"]["spec"])
    assert {p["name"]: p["containerPort"] for p in tg["ports"]} == {
        "tg-http": 8443,
        "tg-admin": 9443,
    }


def test_references_between_rendered_objects_resolve() -> None:
    docs = render(ALL_FLAGS)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployment = only(docs, "Deployment")
    pod_template = deployment["spec"]["template"]
    pod = pod_template["spec"]
    tg = container(pod)
    port_names = {p["name"] for p in tg["ports"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    assert {m["name"] for m in tg["volumeMounts"]} <= volumes.keys()
    assert ("ConfigMap", volumes["tokengate-config"]["configMap"]["name"]) in names
    assert ("Secret", volumes["tokengate-secrets"]["secret"]["secretName"]) in names
    assert ("ServiceAccount", pod["serviceAccountName"]) in names
    labels = pod_template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = only(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8080,
        "admin": 9090,
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    monitor = only(docs, "ServiceMonitor")
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    assert only(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] in port_names
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    policy = only(docs, "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == port_names


@pytest.mark.parametrize(
    ("config", "at_least_s"),
    [({}, 5 + 20), (ALL_FLAGS["config"], 10 + 42.5)],
)
def test_termination_grace_outlasts_the_drain(config: dict[str, Any], at_least_s: float) -> None:
    pod = only(render({"config": config}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > at_least_s


def test_pods_roll_when_the_config_changes() -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = only(render(values), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/tokengate-config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"log": {"level": "DEBUG"}}})


@pytest.mark.parametrize("scenario", ["default", "all_flags"])
def test_rendered_config_is_valid_tokengate_config(scenario: str, tmp_path: Path) -> None:
    config_map = only(render(SCENARIOS[scenario]), "ConfigMap")
    settings = settings_from_yaml(config_map["data"]["tokengate.yaml"], tmp_path)
    assert settings.admin.port == 9090


def test_chart_created_secret_holds_the_values() -> None:
    secret = only(render(ALL_FLAGS), "Secret")
    assert secret["data"] == {"client_secret": "czNjcjN0"}  # base64 of s3cr3t


def test_existing_secret_is_mounted_not_created() -> None:
    docs = render({"secret": {"existingSecret": "oidc", "data": {"client_secret": "ignored"}}})
    assert "Secret" not in {d["kind"] for d in docs}
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    volume = {"name": "tokengate-secrets", "secret": {"secretName": "oidc", "defaultMode": 0o444}}
    assert volume in pod["volumes"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"replicaCount": "two"}, id="replicaCount-string"),
        pytest.param({"mode": "daemonset"}, id="unknown-mode"),
        pytest.param({"replicaCont": 2}, id="misspelt-key"),
        pytest.param({"securityContext": {"readOnlyRootFilesystem": False}}, id="writable-root"),
        pytest.param(
            {"mode": "sidecar", "metrics": {"serviceMonitor": {"enabled": True}}},
            id="servicemonitor-in-sidecar-mode",
        ),
        pytest.param(
            {"mode": "sidecar", "metrics": {"podMonitor": {"enabled": True}}},
            id="podmonitor-without-pod-selector",
        ),
        pytest.param({"config": {"admin": {"port": 70000}}}, id="port-out-of-range"),
    ],
)
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    # Helm applies values.schema.json on every render, as `helm install` does.
    with pytest.raises(helm_python.HelmValuesError):
        render(bad)


def test_image_tag_follows_app_version() -> None:
    # The sidecar templates cannot read the subchart's .Chart, so the tag is a value.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["image"]["tag"] == chart["appVersion"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_finds_nothing_above_info(scenario: str) -> None:
    report = helm_python.lint(CHART, SCENARIOS[scenario], strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_application_chart_includes_the_sidecar(tmp_path: Path) -> None:
    app = tmp_path / "shop"
    (app / "templates").mkdir(parents=True)
    shutil.copytree(CHART, app / "charts" / "tokengate")
    (app / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
        "dependencies:\n  - name: tokengate\n    version: 0.1.0\n",
        encoding="utf-8",
    )
    (app / "values.yaml").write_text(
        "tokengate:\n"
        "  mode: sidecar\n"
        "  secret: {data: {client_secret: s3cr3t}}\n"
        "  config:\n"
        "    limits: {shutdown_delay_s: 3, shutdown_grace_s: 60}\n"
        "    routes: [{prefix: /, upstream: 'http://127.0.0.1:8000', auth: none}]\n",
        encoding="utf-8",
    )
    # The snippet NOTES.txt gives an application chart.
    (app / "templates" / "deployment.yaml").write_text(
        """\
{{- $tg := dict "Values" .Values.tokengate "Release" .Release }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
      annotations:
        {{- include "tokengate.podAnnotations" $tg | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "tokengate.terminationGracePeriodSeconds" $tg }}
      containers:
        - name: app
          image: example/shop:1.0
          args: ["--listen", "127.0.0.1:8000"]
        {{- include "tokengate.sidecarContainer" $tg | nindent 8 }}
      volumes:
        {{- include "tokengate.configVolume" $tg | nindent 8 }}
""",
        encoding="utf-8",
    )
    docs = render({}, chart_dir=app)
    for doc in docs:
        validate_kubernetes(doc, CHART_KUBE_VERSIONS)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod_template = only(docs, "Deployment")["spec"]["template"]
    pod = pod_template["spec"]
    assert [c["name"] for c in pod["containers"]] == ["app", "tokengate"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The named templates name what the subchart rendered, from the application's side.
    assert ("ConfigMap", volumes["tokengate-config"]["configMap"]["name"]) in names
    assert ("Secret", volumes["tokengate-secrets"]["secret"]["secretName"]) in names
    assert pod["terminationGracePeriodSeconds"] > 3 + 60
    assert "checksum/tokengate-config" in pod_template["metadata"]["annotations"]
    assert container(pod)["securityContext"]["readOnlyRootFilesystem"] is True


# --- deploy/: kustomize manifests ----------------------------------------------------


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_every_deploy_file_is_accounted_for() -> None:
    relative = {p.relative_to(DEPLOY).as_posix() for p in deploy_files()}
    assert relative >= NOT_KUBERNETES


@pytest.mark.parametrize(
    "path",
    [p for p in deploy_files() if p.relative_to(DEPLOY).as_posix() not in NOT_KUBERNETES],
    ids=lambda p: p.relative_to(DEPLOY).as_posix(),
)
def test_deploy_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        if doc["kind"] == "Kustomization":  # kustomize's own file, not an API object
            for name in doc["resources"]:
                assert (path.parent / name).is_file(), name
            for generator in doc.get("configMapGenerator", []):
                for name in generator["files"]:
                    assert (path.parent / name).is_file(), name
            continue
        validate_kubernetes(doc, DEPLOY_KUBE_VERSIONS)


def test_sidecar_example_is_consistent(tmp_path: Path) -> None:
    sidecar = DEPLOY / "sidecar"
    kustomization = load_yaml_docs(sidecar / "kustomization.yaml")[0]
    objects = [d for name in kustomization["resources"] for d in load_yaml_docs(sidecar / name)]
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    deployment = next(d for d in objects if d["metadata"]["name"] == "echo")
    pod = deployment["spec"]["template"]["spec"]
    tg = container(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tokengate-config"]["configMap"]["name"] in generated

    settings = settings_from_yaml(
        (sidecar / "tokengate.yaml").read_text(encoding="utf-8"), tmp_path
    )
    # The application listens on loopback, and tokengate forwards there.
    app_args = " ".join(container(pod, "echo")["args"])
    assert all(r.upstream.startswith("http://127.0.0.1:") for r in settings.routes)
    assert all(r.upstream.split("//")[1] in app_args for r in settings.routes)
    assert settings.session.redis_url.startswith("redis://redis:")
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "redis" for d in objects)
    assert {p["containerPort"] for p in tg["ports"]} == {
        settings.listen.port,
        settings.admin.port,
    }
    assert pod["terminationGracePeriodSeconds"] > (
        settings.limits.shutdown_delay_s + settings.limits.shutdown_grace_s
    )
    assert tg["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert tg["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert tg["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == TMP_MOUNT for m in tg["volumeMounts"])

    # deploy/prometheus/servicemonitor.yaml scrapes the example's metrics Service.
    monitor = load_yaml_docs(DEPLOY / "prometheus" / "servicemonitor.yaml")[0]
    metrics_service = next(
        d
        for d in objects
        if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    )
    assert [p["name"] for p in metrics_service["spec"]["ports"]] == [
        e["port"] for e in monitor["spec"]["endpoints"]
    ]
    assert metrics_service["spec"]["ports"][0]["targetPort"] == "tg-admin"


# --- Prometheus and Grafana ----------------------------------------------------------


def test_alert_rules_are_identical_everywhere() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text(encoding="utf-8"))
    chart_rules = yaml.safe_load((CHART / "files" / "rules.yml").read_text(encoding="utf-8"))
    operator_rule = load_yaml_docs(DEPLOY / "prometheus" / "alerts.yaml")[0]
    rendered = only(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    assert rules == chart_rules == operator_rule["spec"] == rendered["spec"]


def test_promtool_checks_the_rules() -> None:
    rules = DEPLOY / "prometheus" / "rules.yml"
    result = run_tool(PROMTOOL, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = run_tool(PROMTOOL, "test", "rules", DEPLOY / "prometheus" / "rules.test.yml")
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_alerts_cover_the_operational_failures() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text(encoding="utf-8"))
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    used = {name for expr in exprs.values() for name in promql_metric_names(expr)}
    assert used <= KNOWN_METRICS
    assert {
        "tokengate_refresh_total",
        "tokengate_http_requests_total",
        "tokengate_jwks_fetch_total",
        "tokengate_session_store_errors_total",
        "tokengate_ready",
    } <= used


def test_scrape_config_keeps_only_the_admin_port(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yaml").read_text("utf-8"))
    job = next(j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j)
    keep = next(
        r
        for r in job["relabel_configs"]
        if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    )
    assert (keep["action"], keep["regex"]) == ("keep", "tg-admin")
    # Debian's promtool is built without Kubernetes service discovery; check the rest
    # (relabel rules, static job, rule_files) with the Kubernetes SD block taken out.
    for scrape in config["scrape_configs"]:
        if scrape.pop("kubernetes_sd_configs", None) is not None:
            scrape["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    shutil.copy(DEPLOY / "prometheus" / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_tool(PROMTOOL, "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_known_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "tokengate-dashboard.json").read_text("utf-8"))
    exprs = list(dashboard_exprs(dashboard))
    used = {name for expr in exprs for name in promql_metric_names(expr)}
    assert used <= KNOWN_METRICS, used - KNOWN_METRICS
    # Every panel the issue asks for has its metric.
    assert KNOWN_METRICS - {"tokengate_idp_request_duration_seconds"} <= used
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


def test_known_metrics_are_what_gateway_exports() -> None:
    # The list the dashboard and alerts are held to is not empty and holds the core ones.
    assert {"tokengate_http_requests_total", "tokengate_refresh_total"} <= KNOWN_METRICS


# --- linters -------------------------------------------------------------------------


def test_yamllint_strict() -> None:
    # The chart's Go templates are not YAML (.yamllint ignores them); values and Chart are.
    # Relative paths: .yamllint's ignore patterns match the paths as given.
    targets = [CHART, DEPLOY, ROOT / ".yamllint", *(ROOT / "config").glob("*.y*ml")]
    relative = [p.relative_to(ROOT) for p in targets]
    result = run_tool(BIN / "yamllint", "--strict", "-c", ROOT / ".yamllint", *relative)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_nothing() -> None:
    result = run_tool(BIN / "hadolint", "--no-color", ROOT / "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_runs_unprivileged_and_read_only() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.strip() for line in text.replace("\\\n", " ").splitlines() if line and line[0] != "#"
    ]
    final_stage = instructions[max(i for i, x in enumerate(instructions) if x.startswith("FROM")) :]
    assert "USER 10001:10001" in final_stage
    assert "EXPOSE 8080 9090" in final_stage
    assert any("PYTHONDONTWRITEBYTECODE=1" in x for x in final_stage if x.startswith("ENV"))
    assert any(x.startswith("HEALTHCHECK") and "/healthz" in x for x in final_stage)
    assert 'ENTRYPOINT ["tokengate"]' in final_stage
    assert 'CMD ["run", "--config", "/etc/tokengate/tokengate.yaml"]' in final_stage
    # Only the virtualenv crosses from the builder; no source tree, no build tools.
    copies = [x for x in final_stage if x.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/tokengate /opt/tokengate"]
    assert not any(re.search(r"apt-get|pip install", x) for x in final_stage)
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    assert {"!pyproject.toml", "!gateway/"} <= set(patterns)
