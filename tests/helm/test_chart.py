#!/usr/bin/env python3
"""Checks of the Helm chart in helm/identity, with no cluster:

* the real Helm engine (PyPI `helm-python-sdk`, Helm's Go SDK as a shared
  library) lints and renders the chart, and refuses values that break
  values.schema.json or the chart's own rules;
* every rendered manifest is validated strictly against the Kubernetes
  OpenAPI schemas (PyPI `kubernetes-validate`); the Prometheus Operator's
  ServiceMonitor (a CRD, no schema there) is checked by hand;
* the environment the chart sets only uses variables the binary knows
  (KNOWN_VARIABLES, SECRET_VARIABLES and the standard OpenTelemetry ones in
  OTEL_VARIABLES, all in src/config.rs), and reaches all of them;
* the real binary, started with exactly the rendered configuration (ConfigMap
  and Secret values resolved, test values for external secrets, a fresh SQLite
  database holding the application's users table where a value file maps one,
  free ports, a fake OTLP collector) runs the migration Job's command and then
  serves, SERVING on every probe's health service (`liveness` included),
  serves /metrics, exports a trace when tracing is on, exits 0 on SIGTERM, and
  leaves an application table it must not extend as it was.

Run: pip install -r tests/helm/requirements.txt && python3 tests/helm/test_chart.py
Environment: IDENTITY_BIN (default target/debug/identity); without the binary
the start-up test is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from concurrent import futures
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import helm_python
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "identity"
VALUES_DIR = Path(__file__).resolve().parent / "values"
CONFIG_RS = ROOT / "src" / "config.rs"
RELEASE = "identity"
NAMESPACE = "identity"
# The chart's minimum (Chart.yaml kubeVersion) and the newest version
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# CRD kinds kubernetes-validate has no schema for; checked by hand instead.
CRD_GROUPS = ("monitoring.coreos.com/",)
# Value files under tests/helm/values/ that every check renders.
VALUE_FILES = ["minimal.yaml", "production.yaml", "secret-files.yaml", "full.yaml", "leaflock.yaml"]
# The users-table mapping (config.usersTable), where "" is rendered: it means
# "no such column", while null leaves the variable to the binary's default.
USERS_TABLE_VARIABLES = {
    "table": "IDENTITY_USERS_TABLE",
    "idColumn": "IDENTITY_USERS_ID_COLUMN",
    "emailColumn": "IDENTITY_USERS_EMAIL_COLUMN",
    "passwordHashColumn": "IDENTITY_USERS_PASSWORD_HASH_COLUMN",
    "createdAtColumn": "IDENTITY_USERS_CREATED_AT_COLUMN",
    "deletedAtColumn": "IDENTITY_USERS_DELETED_AT_COLUMN",
    "clerkIdColumn": "IDENTITY_USERS_CLERK_ID_COLUMN",
}
# The chart's alerts (templates/prometheusrule.yaml), each with a runbook in
# the chart README and promtool unit tests under tests/helm/alerts/.
ALERTS = {
    "IdentityVerificationErrorRateHigh", "IdentityClerkKeysUnavailable", "IdentityClerkKeysStale",
    "IdentityOutboxBacklogGrowing", "IdentityOutboxMessagesFailing", "IdentityBulkJobFailed",
    "IdentityBulkJobStalled", "IdentityNoReplicaServing",
}
ALERT_TESTS = Path(__file__).resolve().parent / "alerts"
# The health entry that follows only the process (never the database).
LIVENESS_SERVICE = "liveness"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_values(name: str) -> dict[str, Any]:
    with open(VALUES_DIR / name, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def api_key_line(name: str = "ci", scopes: str = "verify") -> str:
    key = secrets.token_urlsafe(32)
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}:{scopes}"


REQUIRED = {
    "secrets": {
        "databaseUrl": "postgres://identity:secret@postgres:5432/identity",
        "apiKeys": api_key_line(),
    }
}


def rust_string_array(source: str, name: str) -> list[str]:
    match = re.search(rf"const {name}: &\[&str\] = &\[(.*?)\];", source, re.S)
    if not match:
        raise AssertionError(f"{name} not found in {CONFIG_RS}")
    names = re.findall(r'"([A-Z0-9_]+)"', match.group(1))
    if not names:
        raise AssertionError(f"{name} in {CONFIG_RS} is empty")
    return names


CONFIG_SOURCE = CONFIG_RS.read_text(encoding="utf-8")
KNOWN_VARIABLES = set(rust_string_array(CONFIG_SOURCE, "KNOWN_VARIABLES"))
SECRET_VARIABLES = set(rust_string_array(CONFIG_SOURCE, "SECRET_VARIABLES"))
# Standard OpenTelemetry variables the binary reads (OTEL_VARIABLES in
# src/config.rs), the only names outside KNOWN_VARIABLES the chart may set.
OTEL_VARIABLES = set(rust_string_array(CONFIG_SOURCE, "OTEL_VARIABLES"))


class Rendered:
    """One rendering of the chart: the manifests by kind and name."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        with helm_python.Chart.load(CHART) as chart:
            self.merged = chart.merge_values(values)
            self.files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.notes = ""
        self.docs: list[tuple[str, dict[str, Any]]] = []
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.docs.append((path, doc))

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for _, doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        # Unnamed, "ConfigMap" is the configuration's, not the Grafana dashboard's.
        found = [
            d for d in self.all(kind)
            if (d["metadata"]["name"] == name if name is not None
                else "grafana_dashboard" not in d["metadata"].get("labels", {}))
        ]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        return found[0] if found else None

    def jobs(self) -> list[dict[str, Any]]:
        return self.all("Job")

    def workloads(self) -> list[dict[str, Any]]:
        return self.all("Deployment") + self.jobs()


def value_sets() -> list[tuple[str, dict[str, Any]]]:
    """(label, values): the chart's defaults plus the required values, and each value file."""
    sets = [("defaults+required", REQUIRED)]
    sets += [(name, load_values(name)) for name in VALUE_FILES]
    return sets


_RENDER_CACHE: dict[str, Rendered] = {}


def rendered(label: str, values: dict[str, Any]) -> Rendered:
    if label not in _RENDER_CACHE:
        _RENDER_CACHE[label] = Rendered(values)
    return _RENDER_CACHE[label]


def container_env_names(render: Rendered, workload: dict[str, Any]) -> set[str]:
    """Every variable name a workload's containers get: env, and envFrom of the chart's ConfigMaps/Secrets."""
    names: set[str] = set()
    for container in workload["spec"]["template"]["spec"]["containers"]:
        names |= {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            doc = render.find(kind, ref["name"])
            if doc is not None:
                names |= set((doc.get("data") or {}).keys())
    return names


class ChartTest(unittest.TestCase):
    maxDiff = None

    # --- Helm engine ------------------------------------------------------

    def test_lint_is_clean(self):
        for label, values in value_sets():
            for kube in KUBE_VERSIONS:
                with self.subTest(values=label, kube=kube):
                    report = helm_python.lint(
                        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube}"
                    )
                    self.assertEqual(report["errors"], [], report)
                    serious = [m for m in report["messages"] if m["severity"] >= 2]
                    self.assertEqual(serious, [], report)

    def test_lint_is_clean_on_the_chart_as_shipped(self):
        """`helm lint helm/identity` and chart-testing's `ct lint` (no ci/ values: the defaults) pass."""
        with helm_python.Chart.load(CHART) as chart:
            chart.validate_schema(None)
            chart.validate_schema({})
        for strict in (False, True):
            for kube in [None, *KUBE_VERSIONS]:
                with self.subTest(strict=strict, kube=kube):
                    report = helm_python.lint(
                        CHART, None, strict=strict, kube_version=f"v{kube}" if kube else None
                    )
                    self.assertEqual(report["errors"], [], report)
                    serious = [m for m in report["messages"] if m["severity"] >= 2]
                    self.assertEqual(serious, [], report)
        self.assertEqual(helm_python.lint(CHART)["errors"], [], "plain `helm lint` with the chart's own values")

    def test_install_without_database_url_and_api_keys_is_refused_with_a_clear_message(self):
        url = REQUIRED["secrets"]["databaseUrl"]
        keys = REQUIRED["secrets"]["apiKeys"]
        cases = [
            ("defaults", {}, ["secrets.databaseUrl (IDENTITY_DATABASE_URL)", "secrets.apiKeys (IDENTITY_API_KEYS)"]),
            ("no API keys", {"secrets": {"databaseUrl": url}}, ["secrets.apiKeys (IDENTITY_API_KEYS)"]),
            ("empty key list", {"secrets": {"databaseUrl": url, "apiKeys": []}}, ["secrets.apiKeys (IDENTITY_API_KEYS)"]),
            ("no database URL", {"secrets": {"apiKeys": keys}}, ["secrets.databaseUrl (IDENTITY_DATABASE_URL)"]),
        ]
        with helm_python.Chart.load(CHART) as chart:
            for case, values, named in cases:
                for install in (True, False):
                    with self.subTest(case=case, install=install):
                        with self.assertRaises(helm_python.HelmError) as caught:
                            chart.render(values, name=RELEASE, namespace=NAMESPACE,
                                         is_install=install, is_upgrade=not install)
                        message = str(caught.exception)
                        self.assertIn("missing required value", message)
                        for name in named:
                            self.assertIn(name, message)
                        for name in {"secrets.databaseUrl (", "secrets.apiKeys ("} - {n.split(" ")[0] + " (" for n in named}:
                            self.assertNotIn(name, message, "names only what is missing")
                        self.assertIn("secrets.existingSecret", message, "says how to use an existing Secret")
                        self.assertIn("gen-api-key", message, "says how to create a key")
            # with the values (or an existing Secret), it renders
            for values in (REQUIRED, {"secrets": {"existingSecret": "identity-credentials"}}):
                files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
                self.assertTrue(any(path.endswith("deployment.yaml") for path in files))

    def test_each_value_set_renders_the_expected_resources(self):
        expected = {
            "defaults+required": {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"},
            "minimal.yaml": {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"},
            "production.yaml": {
                "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service", "ServiceAccount",
                "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
            },
            "secret-files.yaml": {"ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"},
            "full.yaml": {
                "ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount", "Ingress",
            },
            "leaflock.yaml": {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"},
        }
        for label, values in value_sets():
            with self.subTest(values=label):
                render = rendered(label, values)
                self.assertEqual({d["kind"] for _, d in render.docs}, expected[label])
                self.assertIn("grpcurl", render.notes)
                for _, doc in render.docs:
                    meta = doc["metadata"]
                    self.assertTrue(meta.get("name"), doc)
                    self.assertIn("app.kubernetes.io/instance", meta.get("labels", {}), doc["kind"])
                    if doc["kind"] != "ServiceMonitor":
                        self.assertEqual(meta.get("namespace"), NAMESPACE, doc["kind"])
        production = rendered("production.yaml", load_values("production.yaml"))
        self.assertNotIn("replicas", production.one("Deployment")["spec"], "the HPA owns the replica count")
        self.assertEqual([], production.all("Secret"), "existingSecret: the chart creates no Secret")
        self.assertEqual(production.one("PodDisruptionBudget")["spec"]["minAvailable"], 2)
        self.assertNotIn("maxUnavailable", production.one("PodDisruptionBudget")["spec"])

    # --- Kubernetes schemas -----------------------------------------------

    def test_manifests_validate_strictly_against_kubernetes_schemas(self):
        for label, values in value_sets():
            render = rendered(label, values)
            for path, doc in render.docs:
                if doc["apiVersion"].startswith(CRD_GROUPS):
                    continue
                for kube in KUBE_VERSIONS:
                    with self.subTest(values=label, manifest=f"{doc['kind']}/{doc['metadata']['name']}", kube=kube):
                        try:
                            kubernetes_validate.validate(doc, kube, strict=True)
                        except kubernetes_validate.ValidationError as e:
                            where = ".".join(str(p) for p in e.path)
                            self.fail(f"{path}: {doc['kind']} invalid for Kubernetes {e.version} at {where}: {e.message}")
                        except kubernetes_validate.SchemaNotFoundError as e:
                            self.fail(e.message)

    def test_kubernetes_validate_cli_strict_on_rendered_files(self):
        """The same check through the command line tool, on the files as Helm writes them."""
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for label, values in value_sets():
                render = rendered(label, values)
                docs = [d for _, d in render.docs if not d["apiVersion"].startswith(CRD_GROUPS)]
                path = Path(tmp) / f"{label}.yaml"
                path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
                files.append(str(path))
            result = subprocess.run(
                [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                 "-k", KUBE_VERSIONS[-1], *files],
                capture_output=True, text=True, timeout=300,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertNotIn("WARN", result.stdout, "every resource must have a schema")

    def test_service_monitor_structure(self):
        render = rendered("production.yaml", load_values("production.yaml"))
        monitor = render.one("ServiceMonitor")
        service = render.one("Service")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(set(monitor), {"apiVersion", "kind", "metadata", "spec"})
        self.assertEqual(monitor["metadata"]["namespace"], "monitoring")
        self.assertEqual(monitor["metadata"]["labels"].get("release"), "prometheus")
        spec = monitor["spec"]
        self.assertLessEqual(set(spec), {"jobLabel", "namespaceSelector", "selector", "endpoints"})
        self.assertEqual(spec["namespaceSelector"], {"matchNames": [NAMESPACE]})
        selector = spec["selector"]["matchLabels"]
        self.assertLessEqual(selector.items(), service["metadata"]["labels"].items(), "selects the Service")
        port_names = {p["name"] for p in service["spec"]["ports"]}
        self.assertTrue(spec["endpoints"])
        for endpoint in spec["endpoints"]:
            self.assertLessEqual(set(endpoint), {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"})
            self.assertIn(endpoint["port"], port_names)
            self.assertIn(endpoint["scheme"], ("http", "https"))
            self.assertTrue(endpoint["path"].startswith("/"))
            for key in ("interval", "scrapeTimeout"):
                self.assertRegex(endpoint[key], r"^[0-9]+(ms|s|m|h)$")
        self.assertEqual([e["port"] for e in spec["endpoints"]], ["metrics"])
        self.assertEqual([e["path"] for e in spec["endpoints"]], ["/metrics"])
        # off by default
        self.assertEqual([], rendered("defaults+required", REQUIRED).all("ServiceMonitor"))

    # --- Grafana dashboard and alerting rules ----------------------------

    def test_grafana_dashboard_configmap(self):
        render = rendered("production.yaml", load_values("production.yaml"))
        config_map = render.one("ConfigMap", f"{RELEASE}-grafana-dashboard")
        self.assertEqual(config_map["metadata"]["labels"].get("grafana_dashboard"), "1", "the sidecar's label")
        self.assertEqual(config_map["metadata"]["annotations"], {"grafana_folder": "Identity"})
        self.assertEqual(set(config_map["data"]), {"identity.json"})
        dashboard = json.loads(config_map["data"]["identity.json"])
        self.assertEqual(dashboard["uid"], "identity-service")
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        self.assertEqual(variables, {"datasource", "namespace", "job"})
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        self.assertTrue(exprs)
        ids = [p["id"] for p in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")
        for expr in exprs:
            with self.subTest(expr=expr):
                selectors = re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr)
                self.assertTrue(selectors, "every metric carries a selector")
                for name, labels in selectors:
                    self.assertTrue(name.startswith("identity_"), name)
                    self.assertIn('namespace="$namespace"', labels)
                    self.assertIn('job="$job"', labels)
        titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
        for topic in ("verification rate by method and outcome", "rejection reasons", "latency", "jwks",
                      "key age", "token cache hit ratio", "outbox", "bulk", "db pool saturation", "migration progress"):
            self.assertIn(topic, titles)
        # off by default
        self.assertIsNone(rendered("defaults+required", REQUIRED).find("ConfigMap", f"{RELEASE}-grafana-dashboard"))

    def rules(self) -> list[dict[str, Any]]:
        render = rendered("production.yaml", load_values("production.yaml"))
        rule = render.one("PrometheusRule")
        self.assertEqual(rule["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(rule["metadata"]["labels"].get("release"), "kube-prometheus-stack")
        return rule["spec"]["groups"]

    def test_prometheus_rule_names_labels_and_runbooks(self):
        groups = self.rules()
        readme = (CHART / "README.md").read_text(encoding="utf-8")
        names = [r["alert"] for g in groups for r in g["rules"]]
        self.assertEqual(len(names), len(set(names)), "alert names are unique")
        self.assertEqual(set(names), ALERTS)
        for group in groups:
            self.assertRegex(group["name"], r"^[a-z][a-z0-9_.-]*$")
            for rule in group["rules"]:
                with self.subTest(alert=rule["alert"]):
                    self.assertRegex(rule["alert"], r"^Identity[A-Z][A-Za-z]+$")
                    self.assertIn(rule["labels"]["severity"], ("warning", "critical"))
                    self.assertEqual(rule["labels"]["team"], "platform", "additionalLabels")
                    for key in rule["labels"]:
                        self.assertRegex(key, r"^[a-zA-Z_][a-zA-Z0-9_]*$")
                    self.assertLessEqual({"summary", "description", "runbook_url"}, set(rule["annotations"]))
                    anchor = rule["alert"].lower()
                    self.assertTrue(rule["annotations"]["runbook_url"].endswith(f"README.md#{anchor}"))
                    self.assertIn(f"### {rule['alert']}", readme, "a runbook paragraph in the chart README")
                    if "for" in rule:
                        self.assertRegex(rule["for"], r"^[0-9]+[smh]$")
                    selectors = re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", rule["expr"])
                    self.assertTrue(selectors)
                    for name, labels in selectors:
                        self.assertTrue(name.startswith("identity_"), name)
                        self.assertIn(f'namespace="{NAMESPACE}"', labels, "scoped to the release")
                        self.assertIn('job="identity"', labels, "the ServiceMonitor's job label")
        # off by default, and no runbook link without a base URL
        self.assertEqual([], rendered("defaults+required", REQUIRED).all("PrometheusRule"))
        plain = Rendered(deep_merge(REQUIRED, {"prometheusRule": {"enabled": True}}))
        for rule in plain.one("PrometheusRule")["spec"]["groups"][0]["rules"]:
            self.assertNotIn("runbook_url", rule["annotations"])

    def test_promtool_checks_and_unit_tests_the_rules(self):
        """`promtool check rules` on the rendered rules, then the unit tests in tests/helm/alerts/."""
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI") in ("true", "1"):
                self.fail("promtool is not installed (apt-get install prometheus): required under CI")
            self.skipTest("promtool is not installed (apt-get install prometheus)")
        tests = sorted(ALERT_TESTS.glob("*.yaml"))
        self.assertTrue(tests)
        fired: set[str] = set()
        quiet: set[str] = set()
        for path in tests:
            for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
                for check in case.get("alert_rule_test", []):
                    (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
        self.assertEqual(fired, ALERTS, "every alert fires in a unit test")
        self.assertEqual(quiet, ALERTS, "every alert stays quiet in a unit test")
        with tempfile.TemporaryDirectory() as tmp:
            rules = Path(tmp) / "rules.yaml"
            rules.write_text(yaml.safe_dump({"groups": self.rules()}, sort_keys=False), encoding="utf-8")
            check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
            self.assertIn(f"SUCCESS: {len(ALERTS)} rules found", check.stdout)
            for path in tests:
                shutil.copy(path, Path(tmp) / path.name)
                run = subprocess.run([promtool, "test", "rules", path.name], cwd=tmp, capture_output=True, text=True)
                self.assertEqual(run.returncode, 0, f"{path.name}:\n{run.stdout}{run.stderr}")

    # --- the chart's wiring ------------------------------------------------

    def test_selectors_ports_and_probes_line_up(self):
        for label, values in value_sets():
            with self.subTest(values=label):
                render = rendered(label, values)
                deployment = render.one("Deployment")
                pod = deployment["spec"]["template"]
                pod_labels = pod["metadata"]["labels"]
                self.assertLessEqual(deployment["spec"]["selector"]["matchLabels"].items(), pod_labels.items())
                service = render.one("Service")
                self.assertLessEqual(service["spec"]["selector"].items(), pod_labels.items())
                container = pod["spec"]["containers"][0]
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                for port in service["spec"]["ports"]:
                    self.assertIn(port["targetPort"], ports)
                self.assert_service_ports_unique(service)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    self.assertEqual(container[probe]["grpc"]["port"], ports["grpc"], probe)
                for kind in ("PodDisruptionBudget", "NetworkPolicy"):
                    for doc in render.all(kind):
                        sel = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
                        self.assertLessEqual(sel.items(), pod_labels.items(), kind)
                for hpa in render.all("HorizontalPodAutoscaler"):
                    self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"])
                for job in render.jobs():
                    job_labels = job["spec"]["template"]["metadata"]["labels"]
                    self.assertFalse(
                        deployment["spec"]["selector"]["matchLabels"].items() <= job_labels.items(),
                        "migration pods must not match the server's selectors",
                    )
                config = render.one("ConfigMap")["data"]
                host_port = config["IDENTITY_LISTEN_ADDR"].rsplit(":", 1)
                self.assertEqual(int(host_port[1]), ports["grpc"])
                grace = int(config["IDENTITY_SHUTDOWN_GRACE_SECONDS"])
                pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                self.assertGreater(pod["spec"]["terminationGracePeriodSeconds"], grace + pre_stop)
                annotations = pod["metadata"]["annotations"]
                self.assertIn("checksum/config", annotations)

    def assert_service_ports_unique(self, service: dict[str, Any]) -> None:
        # The API server refuses a Service with two entries of one port and protocol.
        numbers = [(p["port"], p.get("protocol", "TCP")) for p in service["spec"]["ports"]]
        self.assertEqual(len(numbers), len(set(numbers)), f"duplicate Service ports: {numbers}")
        names = [p["name"] for p in service["spec"]["ports"]]
        self.assertEqual(len(names), len(set(names)), f"duplicate Service port names: {names}")

    def test_forward_auth_on_the_metrics_port_declares_it_once(self):
        # forwardAuth.port defaults to metrics.port: the same listener, one Service port.
        values = deep_merge(REQUIRED, {"forwardAuth": {"enabled": True}})
        service = rendered("forward-auth-default-port", values).one("Service")
        self.assert_service_ports_unique(service)
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        self.assertEqual(ports.get("metrics"), 9464)
        self.assertNotIn("forward-auth", ports)
        # Another number: a port of its own, to the same container port.
        values = deep_merge(REQUIRED, {"forwardAuth": {"enabled": True, "port": 8081}})
        service = rendered("forward-auth-own-port", values).one("Service")
        self.assert_service_ports_unique(service)
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        self.assertEqual(by_name["forward-auth"]["port"], 8081)
        self.assertEqual(by_name["forward-auth"]["targetPort"], "metrics")
        # Metrics off: forward-auth keeps its port on the Service.
        values = deep_merge(REQUIRED, {"forwardAuth": {"enabled": True}, "metrics": {"enabled": False}})
        service = rendered("forward-auth-no-metrics", values).one("Service")
        self.assertEqual({p["name"]: p["port"] for p in service["spec"]["ports"]}.get("forward-auth"), 9464)
        for kube in KUBE_VERSIONS:
            with self.subTest(kube=kube):
                kubernetes_validate.validate(service, kube, strict=True)

    def test_pods_are_locked_down(self):
        for label, values in value_sets():
            render = rendered(label, values)
            for workload in render.workloads():
                with self.subTest(values=label, workload=workload["kind"]):
                    pod = workload["spec"]["template"]["spec"]
                    self.assertIs(pod["automountServiceAccountToken"], False)
                    self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
                    self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
                    for container in pod["containers"]:
                        sc = container["securityContext"]
                        self.assertIs(sc["readOnlyRootFilesystem"], True)
                        self.assertIs(sc["allowPrivilegeEscalation"], False)
                        self.assertIs(sc["runAsNonRoot"], True)
                        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                        mounts = {m["mountPath"] for m in container["volumeMounts"]}
                        self.assertLessEqual({"/tmp", "/var/lib/identity"}, mounts)
                        self.assertEqual(container["workingDir"], "/var/lib/identity")
                        self.assertIn("resources", container)

    def test_migration_job_is_a_hook_running_migrate(self):
        for label, values in value_sets():
            render = rendered(label, values)
            config = render.one("ConfigMap")["data"]
            if not render.merged["migration"]["enabled"]:
                self.assertEqual(render.jobs(), [])
                self.assertEqual(config["IDENTITY_MIGRATE_ON_START"], "true")
                continue
            with self.subTest(values=label):
                job = render.one("Job")
                annotations = job["metadata"]["annotations"]
                self.assertEqual(annotations["helm.sh/hook"], "pre-install,pre-upgrade")
                self.assertEqual(job["spec"]["template"]["spec"]["containers"][0]["args"], ["migrate"])
                self.assertEqual(config["IDENTITY_MIGRATE_ON_START"], "false")
                # Everything the Job reads exists before the release's own resources.
                spec = job["spec"]["template"]["spec"]
                self.assertNotIn("serviceAccountName", spec)
                for container in spec["containers"]:
                    self.assertNotIn("envFrom", container)
                    for env in container["env"]:
                        ref = env.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            hook_secret = render.find("Secret", ref["name"])
                            existing = render.merged["secrets"]["existingSecret"]
                            if existing:
                                self.assertEqual(ref["name"], existing)
                            else:
                                self.assertIsNotNone(hook_secret, ref)
                                self.assertIn("pre-install", hook_secret["metadata"]["annotations"]["helm.sh/hook"])
                                self.assertLess(
                                    int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]),
                                    int(annotations["helm.sh/hook-weight"]),
                                )
                                self.assertNotIn("api-keys", hook_secret["data"], "the Job needs no API keys")

    def test_network_policy_rules(self):
        render = rendered("production.yaml", load_values("production.yaml"))
        policy = render.one("NetworkPolicy")["spec"]
        self.assertEqual(policy["policyTypes"], ["Ingress", "Egress"])
        ingress_ports = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
        self.assertEqual(ingress_ports, ["grpc", "metrics"])
        grpc_from = policy["ingress"][0]["from"]
        self.assertEqual(grpc_from[0]["podSelector"]["matchLabels"], {"identity-client": "true"})
        self.assertEqual(grpc_from[0]["namespaceSelector"]["matchLabels"], {"identity-access": "true"})
        metrics_from = policy["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]
        self.assertEqual(metrics_from, {"kubernetes.io/metadata.name": "monitoring"})
        egress_ports = sorted({p["port"] for rule in policy["egress"] for p in rule["ports"]})
        self.assertEqual(egress_ports, [53, 443, 587, 5432], "DNS, Clerk, SMTP (smtp transport), database")
        self.assertEqual(policy["egress"][1]["to"], [{"ipBlock": {"cidr": "10.20.0.0/16"}}])
        smtp = [rule for rule in policy["egress"] if [p["port"] for p in rule["ports"]] == [587]]
        self.assertEqual(len(smtp), 1)
        self.assertEqual(smtp[0]["to"], [{"ipBlock": {"cidr": "10.30.0.25/32"}}], "SMTP only to the relay")
        # SMTP egress follows the mail transport unless set explicitly
        def smtp_ports(override: dict[str, Any]) -> list[int]:
            render = Rendered(deep_merge(REQUIRED, deep_merge({"networkPolicy": {"enabled": True}}, override)))
            rules = render.one("NetworkPolicy")["spec"]["egress"]
            return sorted(p["port"] for rule in rules for p in rule["ports"] if p["port"] in (25, 465, 587))
        self.assertEqual(smtp_ports({}), [], "log transport: no SMTP")
        self.assertEqual(smtp_ports({"secrets": {"smtpUrl": "smtps://mail.example.com:465"}}), [465, 587])
        self.assertEqual(smtp_ports({"secrets": {"smtpUrl": "smtps://mail.example.com:465"},
                                     "config": {"mail": {"transport": "log"}}}), [])
        self.assertEqual(smtp_ports({"networkPolicy": {"egress": {"smtp": {"enabled": True, "ports": [25]}}}}), [25])
        self.assertEqual(smtp_ports({"secrets": {"smtpUrl": "smtp://mail.example.com:587"},
                                     "networkPolicy": {"egress": {"smtp": {"enabled": False}}}}), [])
        # default (same-namespace) callers; metrics (on by default) from the monitoring namespace
        default = Rendered(deep_merge(REQUIRED, {"networkPolicy": {"enabled": True}}))
        rule = default.one("NetworkPolicy")["spec"]["ingress"][0]
        self.assertEqual(list(rule["from"][0]), ["podSelector"])
        self.assertEqual([p["port"] for r in default.one("NetworkPolicy")["spec"]["ingress"] for p in r["ports"]], ["grpc", "metrics"])
        no_metrics = Rendered(deep_merge(REQUIRED, {"networkPolicy": {"enabled": True}, "metrics": {"enabled": False}}))
        self.assertEqual(len(no_metrics.one("NetworkPolicy")["spec"]["ingress"]), 1, "no metrics rule without metrics")
        # OTLP egress follows tracing unless set explicitly
        def otlp_rules(override: dict[str, Any]) -> list[dict[str, Any]]:
            render = Rendered(deep_merge(REQUIRED, deep_merge({"networkPolicy": {"enabled": True}}, override)))
            rules = render.one("NetworkPolicy")["spec"]["egress"]
            return [rule for rule in rules if any(p["port"] in (4317, 4320) for p in rule["ports"])]
        tracing = {"tracing": {"enabled": True, "endpoint": "http://otel-collector.observability.svc:4317"}}
        self.assertEqual(otlp_rules({}), [], "no tracing: no OTLP")
        self.assertEqual(otlp_rules(tracing), [{"ports": [{"port": 4317, "protocol": "TCP"}]}])
        peer = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
        self.assertEqual(
            otlp_rules(deep_merge(tracing, {"networkPolicy": {"egress": {"otlp": {"ports": [4320], "to": peer}}}})),
            [{"ports": [{"port": 4320, "protocol": "TCP"}], "to": peer}],
        )
        self.assertEqual(otlp_rules(deep_merge(tracing, {"networkPolicy": {"egress": {"otlp": {"enabled": False}}}})), [])
        self.assertEqual(len(otlp_rules({"networkPolicy": {"egress": {"otlp": {"enabled": True}}}})), 1)

    def test_metrics_and_tracing_wiring(self):
        def wiring(render: Rendered) -> tuple[dict[str, str], dict[str, int], dict[str, Any], dict[str, Any]]:
            container = render.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            service = {p["name"]: p for p in render.one("Service")["spec"]["ports"]}
            env = {e["name"]: e for e in container["env"]}
            return render.one("ConfigMap")["data"], ports, service, env

        # defaults: metrics on, on all interfaces, port 9464 on the pod and the Service; no traces
        config, ports, service, env = wiring(rendered("defaults+required", REQUIRED))
        self.assertEqual(config["IDENTITY_METRICS_ADDR"], "0.0.0.0:9464")
        self.assertEqual(ports["metrics"], 9464)
        self.assertEqual((service["metrics"]["port"], service["metrics"]["targetPort"]), (9464, "metrics"))
        self.assertFalse({k for k in [*config, *env] if k.startswith("OTEL_")}, "tracing is off by default")
        self.assertNotIn("IDENTITY_STATS_FLUSH_SECONDS", config, "null: the binary's default")
        # IPv6 bind: the metrics listener follows config.listenHost
        config, _, _, _ = wiring(rendered("secret-files.yaml", load_values("secret-files.yaml")))
        self.assertEqual(config["IDENTITY_METRICS_ADDR"], "[::]:9464")
        # metrics off: the binary's loopback default is switched off too
        config, ports, service, _ = wiring(Rendered(deep_merge(REQUIRED, {"metrics": {"enabled": False}})))
        self.assertEqual(config["IDENTITY_METRICS_ADDR"], "off")
        self.assertNotIn("metrics", ports)
        self.assertNotIn("metrics", service)
        # full.yaml: every tracing setting
        render = rendered("full.yaml", load_values("full.yaml"))
        config, ports, service, env = wiring(render)
        self.assertEqual(config["IDENTITY_METRICS_ADDR"], "0.0.0.0:9465")
        self.assertEqual((ports["metrics"], service["metrics"]["port"]), (9465, 9465))
        self.assertEqual(config["IDENTITY_STATS_FLUSH_SECONDS"], "15")
        self.assertEqual(
            {k: v for k, v in config.items() if k.startswith("OTEL_")},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                "OTEL_SERVICE_NAME": "identity-full",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
            },
        )
        self.assertEqual(
            env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"],
            {"name": "otel-credentials", "key": "otlp-headers"},
        )
        for job in render.jobs():
            names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
            self.assertFalse({n for n in names if n.startswith("OTEL_") or n == "IDENTITY_METRICS_ADDR"},
                             "the migration Job neither serves metrics nor exports traces")
        # minimal tracing: endpoint and service name only
        config, _, _, env = wiring(Rendered(deep_merge(REQUIRED, {"tracing": {"enabled": True, "endpoint": "http://otel:4317"}})))
        self.assertEqual({k for k in config if k.startswith("OTEL_")}, {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"})
        self.assertEqual(config["OTEL_SERVICE_NAME"], "identity")
        self.assertNotIn("OTEL_EXPORTER_OTLP_HEADERS", env)

    def test_webhook_ingress_routes_only_the_exact_webhook_path(self):
        def ports(render: Rendered) -> tuple[dict[str, Any], dict[str, int]]:
            container = render.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
            service = {p["name"]: p for p in render.one("Service")["spec"]["ports"]}
            return service, {p["name"]: p["containerPort"] for p in container["ports"]}

        def validate(render: Rendered, label: str) -> None:
            for kube in KUBE_VERSIONS:
                with self.subTest(ingress=label, kube=kube):
                    try:
                        kubernetes_validate.validate(render.one("Ingress"), kube, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(f"Ingress ({label}) invalid for Kubernetes {e.version}: {e.message}")

        # Off by default: no Ingress, no webhooks port.
        for label, values in value_sets():
            if label == "full.yaml":
                continue
            with self.subTest(values=label):
                render = rendered(label, values)
                self.assertEqual(render.all("Ingress"), [])
                self.assertNotIn("webhooks", ports(render)[0])
        with open(CHART / "values.yaml", encoding="utf-8") as f:
            self.assertFalse(yaml.safe_load(f)["ingress"]["enabled"])

        # full.yaml: every ingress value.
        render = rendered("full.yaml", load_values("full.yaml"))
        ingress = render.one("Ingress")
        service = render.one("Service")
        spec = ingress["spec"]
        self.assertEqual(spec["ingressClassName"], "nginx")
        self.assertEqual(spec["tls"], [{"secretName": "identity-webhooks-tls", "hosts": ["identity.example.com"]}])
        self.assertEqual(ingress["metadata"]["annotations"], {"cert-manager.io/cluster-issuer": "letsencrypt"})
        self.assertEqual(len(spec["rules"]), 1, "one rule")
        self.assertEqual(spec["rules"][0]["host"], "identity.example.com")
        self.assertEqual(
            spec["rules"][0]["http"]["paths"],
            [{
                "path": "/webhooks/clerk",
                "pathType": "Exact",
                "backend": {"service": {"name": service["metadata"]["name"], "port": {"name": "webhooks"}}},
            }],
            "exactly Clerk's webhook path, nothing else of the HTTP listener",
        )
        self.assertNotIn("defaultBackend", spec)
        service_ports, container_ports = ports(render)
        self.assertEqual(
            (service_ports["webhooks"]["port"], service_ports["webhooks"]["targetPort"]), (8080, "metrics")
        )
        self.assertIn("metrics", container_ports, "the webhooks port targets the HTTP listener")
        self.assertIn("IDENTITY_CLERK_WEBHOOK_SECRET_FILE", container_env_names(render, render.one("Deployment")))
        validate(render, "full.yaml")

        # The least: no host, class or TLS; the HTTP listener on with metrics and forward-auth off.
        least = Rendered(deep_merge(REQUIRED, {
            "ingress": {"enabled": True},
            "metrics": {"enabled": False},
            "secrets": {"clerkWebhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        }))
        spec = least.one("Ingress")["spec"]
        self.assertEqual(set(spec), {"rules"})
        self.assertEqual(list(spec["rules"][0]), ["http"], "any host")
        self.assertEqual([p["path"] for p in spec["rules"][0]["http"]["paths"]], ["/webhooks/clerk"])
        self.assertNotIn("annotations", least.one("Ingress")["metadata"])
        self.assertEqual(least.one("ConfigMap")["data"]["IDENTITY_METRICS_ADDR"], "0.0.0.0:9464")
        service_ports, container_ports = ports(least)
        self.assertEqual(set(service_ports), {"grpc", "webhooks"}, "no metrics port on the Service")
        self.assertEqual(container_ports["metrics"], 9464)
        validate(least, "least")
        # An existing Secret naming the webhook key is enough.
        existing = Rendered({
            "secrets": {"existingSecret": "creds", "keys": {"clerkWebhookSecret": "clerk-webhook"}},
            "ingress": {"enabled": True, "host": "hooks.example.com"},
        })
        self.assertEqual(existing.one("Ingress")["spec"]["rules"][0]["host"], "hooks.example.com")

        # With a NetworkPolicy, the ingress controller reaches the HTTP listener.
        policy = Rendered(deep_merge(REQUIRED, {
            "ingress": {"enabled": True},
            "metrics": {"enabled": False},
            "networkPolicy": {"enabled": True},
            "secrets": {"clerkWebhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        })).one("NetworkPolicy")["spec"]["ingress"]
        self.assertEqual([[p["port"] for p in rule["ports"]] for rule in policy], [["grpc"], ["metrics"]])
        self.assertEqual(
            policy[1]["from"][0]["podSelector"]["matchLabels"], {"app.kubernetes.io/name": "ingress-nginx"}
        )

    # --- the binary's configuration contract ------------------------------

    def test_env_names_are_known_to_the_binary(self):
        allowed = KNOWN_VARIABLES | {f"{name}_FILE" for name in SECRET_VARIABLES} | OTEL_VARIABLES
        for label, values in value_sets():
            render = rendered(label, values)
            for workload in render.workloads():
                with self.subTest(values=label, workload=workload["kind"]):
                    names = container_env_names(render, workload)
                    self.assertTrue(names)
                    unknown = sorted(names - allowed)
                    self.assertEqual(unknown, [], "not in KNOWN_VARIABLES of src/config.rs (nor <SECRET>_FILE, nor OTEL_VARIABLES)")

    def test_every_known_variable_is_reachable_from_values(self):
        reached: set[str] = set()
        for label in ("defaults+required", "secret-files.yaml", "full.yaml", "leaflock.yaml"):
            render = rendered(label, dict(value_sets())[label])
            names = container_env_names(render, render.one("Deployment"))
            reached |= {n.removesuffix("_FILE") if n.removesuffix("_FILE") in SECRET_VARIABLES else n for n in names}
        missing = sorted(KNOWN_VARIABLES - reached)
        self.assertEqual(
            missing, [],
            "variables the binary reads that the chart never sets: add each to helm/identity "
            "(config -> identity.configEnv, or secrets -> identity.secretVariables in _helpers.tpl), "
            "values.yaml, values.schema.json and the chart README",
        )

    def test_secret_values_reach_the_secret(self):
        values = load_values("secret-files.yaml")
        render = rendered("secret-files.yaml", values)
        data = {k: base64.b64decode(v).decode() for k, v in render.one("Secret")["data"].items()}
        self.assertEqual(data["api-keys"], ";".join(values["secrets"]["apiKeys"]))
        self.assertEqual(data["database-url"], values["secrets"]["databaseUrl"])
        container = render.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(env["IDENTITY_API_KEYS_FILE"]["value"], "/var/run/secrets/identity/api-keys")
        self.assertNotIn("IDENTITY_API_KEYS", env)

    def test_mail_wiring(self):
        # production.yaml: SMTP URL from a key of the existing Secret, smtp transport
        render = rendered("production.yaml", load_values("production.yaml"))
        container = render.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(
            env["IDENTITY_SMTP_URL"]["valueFrom"]["secretKeyRef"],
            {"name": "identity-credentials", "key": "SMTP_URL"},
        )
        config = render.one("ConfigMap")["data"]
        self.assertEqual(config["IDENTITY_MAIL_TRANSPORT"], "smtp")
        self.assertEqual(config["IDENTITY_FRONTEND_URL"], "https://app.example.com")
        for job in render.jobs():
            names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
            self.assertNotIn("IDENTITY_SMTP_URL", names, "the migration Job sends no mail")
        # a fractional rate stays fractional
        self.assertEqual(rendered("full.yaml", load_values("full.yaml")).one("ConfigMap")["data"]["IDENTITY_CLERK_API_RATE"], "4.5")
        # defaults: nothing set, the binary's defaults apply (log transport)
        config = rendered("defaults+required", REQUIRED).one("ConfigMap")["data"]
        self.assertFalse({k for k in config if "MAIL" in k or "SMTP" in k or "OUTBOX" in k or "INVIT" in k})
        # chart-created Secret: the SMTP URL under smtp-url
        render = Rendered(deep_merge(REQUIRED, {"secrets": {"smtpUrl": "smtps://u:p@mail.example.com:465"}}))
        data = {k: base64.b64decode(v).decode() for k, v in render.one("Secret", "identity")["data"].items()}
        self.assertEqual(data["smtp-url"], "smtps://u:p@mail.example.com:465")
        self.assertIn("WARNING: config.mail.from is not set", render.notes)
        self.assertIn("WARNING: config.invitations.frontendUrl is not set", render.notes)
        # file transport on a volume the pod can write
        for mounts, directory in (([], "/tmp/mail"), ([], "outbox"), ([{"name": "mail", "mountPath": "/srv/mail"}], "/srv/mail/x")):
            with self.subTest(directory=directory):
                Rendered(deep_merge(REQUIRED, {
                    "config": {"mail": {"transport": "file", "dir": directory}},
                    "extraVolumes": [{"name": "mail", "emptyDir": {}}] if mounts else [],
                    "extraVolumeMounts": mounts,
                }))

    def test_users_table_mapping_and_legacy_user_claim(self):
        def job_env(render: Rendered) -> dict[str, Any]:
            return {e["name"]: e for e in render.one("Job")["spec"]["template"]["spec"]["containers"][0]["env"]}

        def users_env(data: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in data.items() if k.startswith("IDENTITY_USERS_")}

        # leaflock.yaml: the LeafLock layout, "" rendered as an empty value (not left out)
        leaflock = {
            "IDENTITY_USERS_TABLE": "users",
            "IDENTITY_USERS_ID_COLUMN": "id",
            "IDENTITY_USERS_EMAIL_COLUMN": "",
            "IDENTITY_USERS_PASSWORD_HASH_COLUMN": "password_hash",
            "IDENTITY_USERS_CREATED_AT_COLUMN": "created_at",
            "IDENTITY_USERS_DELETED_AT_COLUMN": "deleted_at",
            "IDENTITY_USERS_CLERK_ID_COLUMN": "",
        }
        render = rendered("leaflock.yaml", load_values("leaflock.yaml"))
        config = render.one("ConfigMap")["data"]
        self.assertEqual(users_env(config), leaflock)
        self.assertEqual(config["IDENTITY_LEGACY_JWT_USER_CLAIM"], "user_id")
        self.assertEqual(config["IDENTITY_LEGACY_JWT_ALGORITHM"], "HS512")
        configmap_text = next(text for path, text in render.files.items() if path.endswith("configmap.yaml"))
        self.assertIn('IDENTITY_USERS_EMAIL_COLUMN: ""', configmap_text)
        self.assertIn('IDENTITY_USERS_CLERK_ID_COLUMN: ""', configmap_text)
        # the migration Job (which checks the table and may add the Clerk id column) gets the same mapping
        env = job_env(render)
        self.assertEqual({k: e.get("value") for k, e in users_env(env).items()}, leaflock)
        self.assertNotIn("IDENTITY_LEGACY_JWT_USER_CLAIM", env, "the Job verifies no tokens")
        job_text = next(text for path, text in render.files.items() if path.endswith("migration-job.yaml"))
        self.assertRegex(job_text, r'- name: IDENTITY_USERS_EMAIL_COLUMN\n\s+value: ""\n')
        # as the kubelet builds the server's environment: the empty variables are there, empty
        container = render.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
        run = BinaryRun(self, Path("/nonexistent"), render)
        try:
            server_env = run.resolve(render.one("Deployment")["spec"]["template"]["spec"], container)
        finally:
            subprocess.run(["rm", "-rf", str(run.tmp)], check=False)
        self.assertEqual(users_env(server_env), leaflock)

        # defaults: nothing set, the binary's defaults (the seed's layout, claim sub) apply
        render = rendered("defaults+required", REQUIRED)
        config = render.one("ConfigMap")["data"]
        self.assertEqual(users_env(config), {})
        self.assertNotIn("IDENTITY_LEGACY_JWT_USER_CLAIM", config)
        self.assertEqual(users_env(job_env(render)), {})

        # null and "" differ for every column that may be absent; names are passed as given
        for key, variable in USERS_TABLE_VARIABLES.items():
            with self.subTest(value=key):
                if key not in ("table", "idColumn"):
                    config = Rendered(deep_merge(REQUIRED, {"config": {"usersTable": {key: ""}}})).one("ConfigMap")["data"]
                    self.assertEqual(users_env(config), {variable: ""})
                config = Rendered(deep_merge(REQUIRED, {"config": {"usersTable": {key: "Legacy_Col9"}}})).one("ConfigMap")["data"]
                self.assertEqual(users_env(config), {variable: "Legacy_Col9"})
        config = Rendered(deep_merge(REQUIRED, {"config": {"usersTable": {"table": "app.users"}}})).one("ConfigMap")["data"]
        self.assertEqual(config["IDENTITY_USERS_TABLE"], "app.users")
        # `env` still overrides, "" included
        config = Rendered(deep_merge(REQUIRED, {
            "config": {"usersTable": {"emailColumn": "email"}},
            "env": {"IDENTITY_USERS_EMAIL_COLUMN": ""},
        })).one("ConfigMap")["data"]
        self.assertEqual(config["IDENTITY_USERS_EMAIL_COLUMN"], "")

    def test_liveness_follows_only_the_process(self):
        """Liveness (and start-up) ask for the `liveness` health entry; readiness follows the database."""
        for label, values in value_sets():
            with self.subTest(values=label):
                container = rendered(label, values).one("Deployment")["spec"]["template"]["spec"]["containers"][0]
                self.assertEqual(container["livenessProbe"]["grpc"]["service"], LIVENESS_SERVICE)
                self.assertEqual(container["startupProbe"]["grpc"]["service"], LIVENESS_SERVICE)
                self.assertIn(container["readinessProbe"]["grpc"].get("service", ""),
                              ("", "identity.v1.IdentityService", "identity.v1.MigrationService"))
        # a database outage of failureThreshold x periodSeconds must not matter: liveness never asks for it
        with helm_python.Chart.load(CHART) as chart:
            for service in ("", "identity.v1.IdentityService", "identity.v1.MigrationService"):
                with self.subTest(liveness=service):
                    with self.assertRaises(helm_python.HelmValuesError):
                        chart.validate_schema(deep_merge(REQUIRED, {"probes": {"liveness": {"service": service}}}))
            chart.validate_schema(deep_merge(REQUIRED, {"probes": {"startup": {"service": ""}}}))
        readme = (CHART / "README.md").read_text(encoding="utf-8")
        self.assertIn(f"`{LIVENESS_SERVICE}`", readme)

    def test_readme_lists_every_value(self):
        with open(CHART / "values.yaml", encoding="utf-8") as f:
            defaults = yaml.safe_load(f)
        with open(CHART / "values.schema.json", encoding="utf-8") as f:
            schema = json.load(f)
        readme = (CHART / "README.md").read_text(encoding="utf-8")

        def leaves(value: Any, node: dict[str, Any], prefix: str):
            if isinstance(value, dict) and value and node.get("properties"):
                for key, child in value.items():
                    yield from leaves(child, node["properties"].get(key, {}), f"{prefix}{key}.")
            else:
                yield prefix.rstrip(".")

        missing = [name for name in leaves(defaults, schema, "") if f"`{name}`" not in readme]
        self.assertEqual(missing, [], "values missing from helm/identity/README.md")
        documented = set(re.findall(r"`(IDENTITY_[A-Z0-9_]+)`", readme))
        self.assertEqual(sorted(KNOWN_VARIABLES - documented), [], "variables missing from the README's tables")

    # --- values the chart refuses ------------------------------------------

    SCHEMA_VIOLATIONS = [
        ("replicaCount is a number", {"replicaCount": "two"}, "/replicaCount"),
        ("log format", {"config": {"logFormat": "xml"}}, "/config/logFormat"),
        ("port range", {"config": {"port": 70000}}, "/config/port"),
        ("shutdown grace range", {"config": {"shutdownGraceSeconds": 4000}}, "/config/shutdownGraceSeconds"),
        ("request size range", {"config": {"maxRequestBytes": 100}}, "/config/maxRequestBytes"),
        ("pool size range", {"config": {"databaseMaxConnections": 0}}, "/config/databaseMaxConnections"),
        ("unknown top-level value", {"replicas": 3}, "replicas"),
        ("unknown config value", {"config": {"listenAddr": "0.0.0.0:1"}}, "listenAddr"),
        ("database scheme", {"secrets": {"databaseUrl": "mysql://u:p@h/db"}}, "/secrets/databaseUrl"),
        ("api key list entry", {"secrets": {"apiKeys": ["ci:nothex:verify"]}}, "/secrets/apiKeys"),
        ("env name", {"env": {"identity_log_level": "debug"}}, "identity_log_level"),
        ("legacy algorithm", {"config": {"legacyJwt": {"algorithm": "RS256"}}}, "/config/legacyJwt/algorithm"),
        ("Clerk issuer over plain http", {"config": {"clerk": {"issuer": "http://clerk.example.com"}}}, "/config/clerk/issuer"),
        ("unmapped user policy", {"config": {"clerk": {"unmappedUser": "adopt"}}}, "/config/clerk/unmappedUser"),
        ("publishable key", {"config": {"clerk": {"publishableKey": "sk_live_x"}}}, "/config/clerk/publishableKey"),
        ("JWKS staleness range", {"config": {"clerk": {"jwksMaxStalenessSeconds": 10}}}, "/config/clerk/jwksMaxStalenessSeconds"),
        ("token size range", {"config": {"verification": {"maxTokenBytes": 100}}}, "/config/verification/maxTokenBytes"),
        ("Clerk JWT key is PEM", {"secrets": {"clerkJwtKey": "not a key"}}, "/secrets/clerkJwtKey"),
        ("unknown secret", {"secrets": {"smtpPassword": "x"}}, "smtpPassword"),
        ("probe health service", {"probes": {"readiness": {"service": "nope"}}}, "/probes/readiness/service"),
        ("image digest", {"image": {"digest": "latest"}}, "/image/digest"),
        ("pull policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ("pdb percentage", {"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
        ("network policy switch", {"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ("frontend URL scheme", {"config": {"invitations": {"frontendUrl": "ftp://app.example.com"}}}, "/config/invitations/frontendUrl"),
        ("product name length", {"config": {"invitations": {"productName": "x" * 101}}}, "/config/invitations/productName"),
        ("invitation TTL range", {"config": {"invitations": {"ttlSeconds": 30}}}, "/config/invitations/ttlSeconds"),
        ("invitation TTL maximum", {"config": {"invitations": {"ttlSeconds": 2592001}}}, "/config/invitations/ttlSeconds"),
        ("invites per user", {"config": {"invitations": {"perUserPerHour": 0}}}, "/config/invitations/perUserPerHour"),
        ("invites per caller", {"config": {"invitations": {"perCallerPerMinute": 0}}}, "/config/invitations/perCallerPerMinute"),
        ("mail transport", {"config": {"mail": {"transport": "sendmail"}}}, "/config/mail/transport"),
        ("mail from without address", {"config": {"mail": {"from": "LeafLock"}}}, "/config/mail/from"),
        ("mail from unquoted comma", {"config": {"mail": {"from": "Leaf, Lock <a@example.com>"}}}, "/config/mail/from"),
        ("outbox poll range", {"config": {"mail": {"outbox": {"pollSeconds": 0}}}}, "/config/mail/outbox/pollSeconds"),
        ("outbox attempts range", {"config": {"mail": {"outbox": {"maxAttempts": 101}}}}, "/config/mail/outbox/maxAttempts"),
        ("outbox retry range", {"config": {"mail": {"outbox": {"retryBaseSeconds": 3601}}}}, "/config/mail/outbox/retryBaseSeconds"),
        ("SMTP URL scheme", {"secrets": {"smtpUrl": "https://mail.example.com"}}, "/secrets/smtpUrl"),
        ("Clerk request rate above 0", {"config": {"bulk": {"clerkRequestsPerSecond": 0}}}, "/config/bulk/clerkRequestsPerSecond"),
        ("Clerk request rate at most 100", {"config": {"bulk": {"clerkRequestsPerSecond": 150}}}, "/config/bulk/clerkRequestsPerSecond"),
        ("bulk lease range", {"config": {"bulk": {"leaseSeconds": 1}}}, "/config/bulk/leaseSeconds"),
        ("SMTP egress needs ports", {"networkPolicy": {"egress": {"smtp": {"ports": []}}}}, "/networkPolicy/egress/smtp/ports"),
        ("stats flush range", {"config": {"statsFlushSeconds": 301}}, "/config/statsFlushSeconds"),
        ("metrics port range", {"metrics": {"port": 0}}, "/metrics/port"),
        ("webhook retention below Svix's retries", {"config": {"clerkWebhookRetentionDays": 3}}, "/config/clerkWebhookRetentionDays"),
        ("ingress host with a scheme", {"ingress": {"host": "https://identity.example.com"}}, "/ingress/host"),
        ("ingress class name", {"ingress": {"className": "Nginx Public"}}, "/ingress/className"),
        ("unknown ingress value", {"ingress": {"path": "/"}}, "path"),
        ("ingress TLS entry", {"ingress": {"tls": [{"secret": "x"}]}}, "secret"),
        ("ingress port range", {"ingress": {"servicePort": 70000}}, "/ingress/servicePort"),
        ("OTLP endpoint without a scheme", {"tracing": {"enabled": True, "endpoint": "otel.example.com:4317"}}, "/tracing/endpoint"),
        ("OTLP endpoint without scheme", {"tracing": {"enabled": True, "endpoint": "otel:4317"}}, "/tracing/endpoint"),
        ("trace sampler", {"tracing": {"sampler": {"type": "sometimes"}}}, "/tracing/sampler/type"),
        ("trace sampler ratio", {"tracing": {"sampler": {"arg": 1.5}}}, "/tracing/sampler/arg"),
        ("unknown tracing value", {"tracing": {"protocol": "http/protobuf"}}, "protocol"),
        ("OTLP egress needs ports", {"networkPolicy": {"egress": {"otlp": {"ports": []}}}}, "/networkPolicy/egress/otlp/ports"),
        ("users table injection", {"config": {"usersTable": {"table": "users; DROP TABLE users"}}}, "/config/usersTable/table"),
        ("users table with two dots", {"config": {"usersTable": {"table": "a.b.c"}}}, "/config/usersTable/table"),
        ("users table empty", {"config": {"usersTable": {"table": ""}}}, "/config/usersTable/table"),
        ("users table quoted", {"config": {"usersTable": {"table": '"users"'}}}, "/config/usersTable/table"),
        ("id column empty", {"config": {"usersTable": {"idColumn": ""}}}, "/config/usersTable/idColumn"),
        ("column starting with a digit", {"config": {"usersTable": {"emailColumn": "1email"}}}, "/config/usersTable/emailColumn"),
        ("column with a dash", {"config": {"usersTable": {"passwordHashColumn": "password-hash"}}}, "/config/usersTable/passwordHashColumn"),
        ("column of 64 characters", {"config": {"usersTable": {"createdAtColumn": "c" * 64}}}, "/config/usersTable/createdAtColumn"),
        ("column with a space", {"config": {"usersTable": {"deletedAtColumn": "deleted at"}}}, "/config/usersTable/deletedAtColumn"),
        ("column with a schema", {"config": {"usersTable": {"clerkIdColumn": "public.clerk_user_id"}}}, "/config/usersTable/clerkIdColumn"),
        ("unknown users table value", {"config": {"usersTable": {"emailHashColumn": "email_hash"}}}, "emailHashColumn"),
        ("legacy user claim empty", {"config": {"legacyJwt": {"userClaim": ""}}}, "/config/legacyJwt/userClaim"),
        ("legacy user claim with a space", {"config": {"legacyJwt": {"userClaim": "user id"}}}, "/config/legacyJwt/userClaim"),
        ("liveness on the database", {"probes": {"liveness": {"service": ""}}}, "/probes/liveness/service"),
        ("readiness on the process only", {"probes": {"readiness": {"service": "liveness"}}}, "/probes/readiness/service"),
    ]

    TEMPLATE_RULES = [
        ("malformed API key string", {"secrets": {"apiKeys": "ci:abc:verify"}}, "secrets.apiKeys entry 1"),
        ("unknown scope", {"secrets": {"apiKeys": "ci:" + "a" * 64 + ":root"}}, "secrets.apiKeys entry 1"),
        ("only comments", {"secrets": {"apiKeys": "# none yet"}}, "secrets.apiKeys has no entry"),
        ("grace too short", {"terminationGracePeriodSeconds": 20}, "must exceed"),
        ("secret in ConfigMap", {"env": {"IDENTITY_API_KEYS": "x"}}, "env.IDENTITY_API_KEYS"),
        ("secret file in ConfigMap", {"env": {"IDENTITY_DATABASE_URL_FILE": "/x"}}, "env.IDENTITY_DATABASE_URL_FILE"),
        ("ServiceMonitor without metrics", {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "needs metrics.enabled"),
        ("alerts without metrics", {"metrics": {"enabled": False}, "prometheusRule": {"enabled": True}}, "prometheusRule.enabled needs metrics.enabled"),
        ("Grafana dashboard without metrics", {"metrics": {"enabled": False}, "grafanaDashboard": {"enabled": True}}, "grafanaDashboard.enabled needs metrics.enabled"),
        ("metrics on the gRPC port", {"metrics": {"port": 50051}}, "must differ from config.port"),
        ("ingress without the webhook secret", {"ingress": {"enabled": True}}, "needs secrets.clerkWebhookSecret"),
        ("ingress, existing Secret without the webhook key",
         {"secrets": {"existingSecret": "creds", "clerkWebhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
          "ingress": {"enabled": True}},
         "needs secrets.clerkWebhookSecret"),
        ("ingress on the metrics Service port",
         {"ingress": {"enabled": True, "servicePort": 9464},
          "secrets": {"clerkWebhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
         "ingress.servicePort (9464) must differ"),
        ("ingress on the gRPC Service port",
         {"ingress": {"enabled": True, "servicePort": 50051},
          "secrets": {"clerkWebhookSecret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
         "ingress.servicePort (50051) must differ"),
        ("tracing without an endpoint", {"tracing": {"enabled": True}}, "needs tracing.endpoint"),
        ("ratio sampler without a ratio",
         {"tracing": {"enabled": True, "endpoint": "http://otel:4317", "sampler": {"type": "traceidratio"}}},
         "needs tracing.sampler.arg"),
        ("trace headers without the key", {"tracing": {"headers": {"secretName": "otel"}}}, "needs both secretName and secretKey"),
        ("HPA bounds", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
        ("link_by_email needs the secret key", {"config": {"clerk": {"unmappedUser": "link_by_email", "issuer": "https://c.example.com"}}}, "needs secrets.clerkSecretKey"),
        ("HPA target", {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}, "autoscaling needs"),
        ("SMTP URL in ConfigMap", {"env": {"IDENTITY_SMTP_URL": "smtp://mail:587"}}, "env.IDENTITY_SMTP_URL"),
        ("smtp transport needs the URL", {"config": {"mail": {"transport": "smtp"}}}, "needs secrets.smtpUrl"),
        ("smtp transport, existing Secret without the key",
         {"secrets": {"existingSecret": "creds", "smtpUrl": "smtp://mail:587"}, "config": {"mail": {"transport": "smtp"}}},
         "needs secrets.smtpUrl"),
        ("mail folder on the read-only root", {"config": {"mail": {"transport": "file", "dir": "/var/mail"}}}, "read-only root filesystem"),
        ("mail folder escaping the volume", {"config": {"mail": {"transport": "file", "dir": "../../etc/mail"}}}, "read-only root filesystem"),
        ("product name over 100 bytes", {"config": {"invitations": {"productName": "é" * 60}}}, "at most 100"),
        ("users table is the service's own", {"config": {"usersTable": {"table": "identity_users"}}}, "one of the service's own tables"),
        ("users table is the service's own, with a schema",
         {"config": {"usersTable": {"table": "app.identity_users"}}}, "one of the service's own tables"),
    ]

    def test_values_violating_the_schema_are_refused(self):
        with helm_python.Chart.load(CHART) as chart:
            chart.validate_schema(REQUIRED)
            for case, override, where in self.SCHEMA_VIOLATIONS:
                with self.subTest(case=case):
                    values = deep_merge(REQUIRED, override)
                    with self.assertRaises(helm_python.HelmValuesError) as caught:
                        chart.validate_schema(values)
                    self.assertIn(where, str(caught.exception))
                    with self.assertRaises(helm_python.HelmValuesError):
                        chart.render(values, name=RELEASE, namespace=NAMESPACE)
                    report = helm_python.lint(CHART, values)
                    self.assertTrue(report["errors"], f"lint accepted {override}")

    def test_values_breaking_chart_rules_are_refused_with_a_message(self):
        with helm_python.Chart.load(CHART) as chart:
            for case, override, message in self.TEMPLATE_RULES:
                with self.subTest(case=case):
                    values = deep_merge(REQUIRED, override)
                    with self.assertRaises(helm_python.HelmError) as caught:
                        chart.render(values, name=RELEASE, namespace=NAMESPACE)
                    self.assertIn(message, str(caught.exception))

    # --- the real binary --------------------------------------------------

    def test_rendered_config_starts_binary(self):
        binary = Path(os.environ.get("IDENTITY_BIN") or ROOT / "target" / "debug" / "identity").resolve()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            message = f"binary {binary} not found: build it with `cargo build` or set IDENTITY_BIN"
            if os.environ.get("CI") == "true":
                self.fail(message)
            self.skipTest(message)
        sets = value_sets() + [("metrics-off", deep_merge(REQUIRED, {"metrics": {"enabled": False}}))]
        for label, values in sets:
            with self.subTest(values=label):
                BinaryRun(self, binary, rendered(label, values), APP_TABLES.get(label)).run()


@dataclass(frozen=True)
class AppTable:
    """An application's users table (SQLite stand-in) that a value file maps, made before the binary starts."""

    sql: str
    # The service may not add anything to it (clerkIdColumn ""): columns, indexes and triggers stay as they are.
    untouched: bool


# The seed's layout, with its optional clerk_user_id column (full.yaml names each column).
SEED_APP_TABLE = AppTable(
    sql="""
    CREATE TABLE users (
        id TEXT PRIMARY KEY NOT NULL,
        email TEXT UNIQUE NOT NULL,
        password_hash TEXT NOT NULL,
        failed_attempts INTEGER DEFAULT 0,
        created_at TEXT DEFAULT CURRENT_TIMESTAMP,
        updated_at TEXT DEFAULT CURRENT_TIMESTAMP,
        clerk_user_id TEXT UNIQUE
    );
    INSERT INTO users (id, email, password_hash)
        VALUES ('0b7c2a4e-6f1d-4c3b-9a8e-1f2d3c4b5a69', 'ada@example.com', '$2b$12$C6UzMDM.H6dfI/f/IKcEeO5Q8tVqKQ6nJ8ZKxWzGrDq9ZbIuE6ZTm');
    """,
    untouched=False,
)
# LeafLock's layout (leaflock.yaml): no readable email, Argon2id digests, soft delete,
# the application's own tables beside it, and no clerk_user_id, which must not appear.
LEAFLOCK_APP_TABLE = AppTable(
    sql="""
    CREATE TABLE users (
        id TEXT PRIMARY KEY NOT NULL,
        email_hash BLOB UNIQUE NOT NULL,
        email_encrypted BLOB NOT NULL,
        email_search_hash BLOB UNIQUE,
        password_hash TEXT NOT NULL,
        salt BLOB NOT NULL,
        master_key_encrypted BLOB NOT NULL,
        public_key BLOB,
        private_key_encrypted BLOB,
        mfa_secret_encrypted BLOB,
        mfa_enabled INTEGER DEFAULT 0,
        created_at TEXT DEFAULT CURRENT_TIMESTAMP,
        updated_at TEXT DEFAULT CURRENT_TIMESTAMP,
        last_login TEXT,
        failed_attempts INTEGER DEFAULT 0,
        locked_until TEXT,
        deleted_at TEXT,
        is_admin INTEGER DEFAULT 0,
        storage_used INTEGER DEFAULT 0,
        storage_limit INTEGER DEFAULT 5242880,
        theme_preference TEXT DEFAULT 'system'
    );
    CREATE TABLE notes (
        id TEXT PRIMARY KEY NOT NULL,
        user_id TEXT NOT NULL REFERENCES users (id),
        title_encrypted BLOB,
        created_at TEXT DEFAULT CURRENT_TIMESTAMP
    );
    CREATE TABLE audit_log (
        id TEXT PRIMARY KEY NOT NULL,
        user_id TEXT REFERENCES users (id),
        action TEXT NOT NULL,
        created_at TEXT DEFAULT CURRENT_TIMESTAMP
    );
    INSERT INTO users (id, email_hash, email_encrypted, password_hash, salt, master_key_encrypted)
        VALUES ('5f0c1e7a-3b2d-4e8f-9a6b-7c8d9e0f1a2b', x'00', x'01',
                '$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA', x'02', x'03');
    INSERT INTO users (id, email_hash, email_encrypted, password_hash, salt, master_key_encrypted, deleted_at)
        VALUES ('6a1d2f8b-4c3e-4f9a-8b7c-8d9e0f1a2b3c', x'10', x'11',
                '$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA', x'12', x'13',
                datetime('now'));
    """,
    untouched=True,
)
# Value files whose usersTable names a table: it must exist (a named table that is missing stops start-up).
APP_TABLES = {"full.yaml": SEED_APP_TABLE, "leaflock.yaml": LEAFLOCK_APP_TABLE}


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BinaryRun:
    """Starts the binary the way the kubelet would start the rendered containers."""

    def __init__(self, test: unittest.TestCase, binary: Path, render: Rendered, app_table: AppTable | None = None):
        self.test = test
        self.binary = binary
        self.render = render
        self.app_table = app_table
        self.tmp = Path(tempfile.mkdtemp(prefix="identity-chart-"))
        self.database_url = f"sqlite://{self.tmp}/identity.db"
        # Secrets the chart does not create (existingSecret): test values by key.
        self.external: dict[str, dict[str, str]] = {}
        existing = render.merged["secrets"]["existingSecret"]
        if existing:
            test_values = {
                "databaseUrl": "postgres://replaced-by-the-test-database",
                "apiKeys": api_key_line(),
                "legacyJwtSecret": secrets.token_hex(32),
                "smtpUrl": "smtp://identity:test@127.0.0.1:2525?tls=required",
            }
            keys = render.merged["secrets"]["keys"]
            self.external[existing] = {keys[name]: value for name, value in test_values.items() if keys.get(name)}
        # The OTLP headers Secret (tracing.headers) is always the user's.
        self.otlp_header = ("x-chart-test", secrets.token_hex(8))
        headers = render.merged["tracing"]["headers"]
        if render.merged["tracing"]["enabled"] and headers["secretName"]:
            self.external.setdefault(headers["secretName"], {})[headers["secretKey"]] = "=".join(self.otlp_header)

    def secret_data(self, name: str) -> dict[str, str]:
        doc = self.render.find("Secret", name)
        if doc is not None:
            data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            data.update(doc.get("stringData") or {})
            return data
        self.test.assertIn(name, self.external, f"Secret {name} is neither rendered nor the existing one")
        return self.external[name]

    def config_map_data(self, name: str) -> dict[str, str]:
        doc = self.render.find("ConfigMap", name)
        self.test.assertIsNotNone(doc, f"ConfigMap {name} is not rendered")
        return dict(doc.get("data") or {})

    def resolve(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container's environment, as the kubelet would build it, with secret files written under tmp."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_map_data(source["configMapRef"]["name"]))
            elif "secretRef" in source:
                env.update(self.secret_data(source["secretRef"]["name"]))
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
                continue
            ref = entry.get("valueFrom", {})
            if "secretKeyRef" in ref:
                env[entry["name"]] = self.secret_data(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in ref:
                env[entry["name"]] = self.config_map_data(ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
            else:
                self.test.fail(f"cannot resolve env entry {entry}")
        # Mounted secret volumes become files under tmp; paths in the env follow.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" not in volume:
                continue
            target = self.tmp / f"mount-{mount['name']}-{container['name']}"
            target.mkdir(exist_ok=True)
            data = self.secret_data(volume["secret"]["secretName"])
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (target / item["path"]).write_text(data[item["key"]], encoding="utf-8")
            for name, value in env.items():
                if value == mount["mountPath"] or value.startswith(mount["mountPath"].rstrip("/") + "/"):
                    env[name] = str(target) + value[len(mount["mountPath"].rstrip("/")):]
        # The test database instead of the chart's (a fresh SQLite file).
        if "IDENTITY_DATABASE_URL" in env:
            env["IDENTITY_DATABASE_URL"] = self.database_url
        if "IDENTITY_DATABASE_URL_FILE" in env:
            Path(env["IDENTITY_DATABASE_URL_FILE"]).write_text(self.database_url + "\n", encoding="utf-8")
        return env

    def workdir(self, container: dict[str, Any]) -> Path:
        path = self.tmp / "workdir"
        path.mkdir(exist_ok=True)
        return path

    def run(self) -> None:
        try:
            before = self.create_app_table()
            for job in self.render.jobs():
                self.run_job(job)
            self.run_server()
            if self.app_table and self.app_table.untouched:
                self.test.assertEqual(
                    self.app_table_shape(), before,
                    "the application's users table changed although config.usersTable.clerkIdColumn is \"\" "
                    "(an empty variable must reach the binary as \"no such column\", not as unset)",
                )
        finally:
            subprocess.run(["rm", "-rf", str(self.tmp)], check=False)

    def create_app_table(self) -> list[Any] | None:
        """The application's users table in the test database, as the application left it; returns its shape."""
        if not self.app_table:
            return None
        with closing(sqlite3.connect(self.tmp / "identity.db")) as db:
            db.executescript(self.app_table.sql)
            db.commit()
        return self.app_table_shape()

    def app_table_shape(self) -> list[Any]:
        """Columns of `users`, and every index and trigger on it."""
        with closing(sqlite3.connect(self.tmp / "identity.db")) as db:
            columns = db.execute("PRAGMA table_info(users)").fetchall()
            objects = db.execute(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'users' ORDER BY type, name"
            ).fetchall()
        return [columns, objects]

    def run_job(self, job: dict[str, Any]) -> None:
        pod = job["spec"]["template"]["spec"]
        for container in pod["containers"]:
            env = self.resolve(pod, container)
            result = subprocess.run(
                [str(self.binary), *container.get("args", [])],
                env=env, cwd=self.workdir(container), capture_output=True, text=True, timeout=120,
            )
            self.test.assertEqual(
                result.returncode, 0,
                f"migration Job `{' '.join(container.get('args', []))}` failed:\n{result.stdout}\n{result.stderr}",
            )
            self.check_logs(result.stdout + result.stderr, env)
            self.check_database_used()

    def check_database_used(self) -> None:
        """The rendered database URL (replaced by the test's) was used, not the binary's default."""
        self.test.assertTrue((self.tmp / "identity.db").is_file(), "the test database was not created")
        self.test.assertFalse((self.tmp / "workdir" / "identity.db").exists(), "the binary fell back to its default database")

    def run_server(self) -> None:
        deployment = self.render.one("Deployment")
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = self.resolve(pod, container)
        if env.get("IDENTITY_MIGRATE_ON_START", "true").lower() in ("false", "0", "no", "off") and not self.render.jobs():
            env["IDENTITY_MIGRATE_ON_START"] = "true"  # nothing else would have migrated
        host, _, rendered_port = env["IDENTITY_LISTEN_ADDR"].rpartition(":")
        bind_host = host.strip("[]")
        port = free_port(bind_host)
        env["IDENTITY_LISTEN_ADDR"] = f"{host}:{port}"
        # The metrics listener too gets a free port (the rendered one may be taken on this machine).
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        metrics_target = None
        if env.get("IDENTITY_METRICS_ADDR", "off") != "off":
            metrics_host, _, metrics_port = env["IDENTITY_METRICS_ADDR"].rpartition(":")
            self.test.assertEqual(str(ports.get("metrics")), metrics_port, "the metrics container port is the listener's")
            free = free_port(metrics_host.strip("[]"))
            env["IDENTITY_METRICS_ADDR"] = f"{metrics_host}:{free}"
            metrics_target = f"{'[::1]' if ':' in metrics_host.strip('[]') else '127.0.0.1'}:{free}"
        else:
            self.test.assertNotIn("metrics", ports, "a metrics port without a listener")
        # Trace export goes to a fake collector instead of the rendered endpoint.
        collector = None
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            self.test.assertRegex(env["OTEL_EXPORTER_OTLP_ENDPOINT"], r"^http://", "the binary has no TLS for OTLP")
            collector = FakeCollector()
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
        probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe") if name in container}
        for name, probe in probes.items():
            self.test.assertEqual(str(probe["grpc"]["port"]), rendered_port, f"{name} checks the listen port")
        services = sorted({probe["grpc"].get("service", "") for probe in probes.values()})
        connect = "[::1]" if ":" in bind_host else "127.0.0.1"
        if bind_host not in ("0.0.0.0", "::", "127.0.0.1", "::1"):
            self.test.fail(f"unexpected listen host {bind_host}")

        log_path = self.tmp / "server.log"
        with open(log_path, "w+", encoding="utf-8") as log:
            process = subprocess.Popen(
                [str(self.binary), *container.get("args", [])],
                env=env, cwd=self.workdir(container), stdout=log, stderr=subprocess.STDOUT,
            )
            try:
                self.wait_serving(process, f"{connect}:{port}", services, log_path)
                if metrics_target:
                    self.check_metrics(metrics_target)
                trace_id = self.traced_call(f"{connect}:{port}") if collector else None
                process.send_signal(signal.SIGTERM)
                grace = int(env.get("IDENTITY_SHUTDOWN_GRACE_SECONDS", "20"))
                try:
                    code = process.wait(timeout=grace + 10)
                except subprocess.TimeoutExpired:
                    self.test.fail(f"no exit within {grace + 10} s of SIGTERM:\n{log_path.read_text()}")
                self.test.assertEqual(code, 0, f"exit code after SIGTERM:\n{log_path.read_text()}")
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                if collector:
                    collector.stop()
        if collector:
            self.check_trace(collector, trace_id, env)
        self.check_logs(log_path.read_text(encoding="utf-8"), env)
        self.check_database_used()
        if env.get("IDENTITY_MAIL_TRANSPORT") == "file":
            mail_dir = env.get("IDENTITY_MAIL_DIR", "mail")
            if not mail_dir.startswith("/"):
                self.test.assertTrue((self.workdir(container) / mail_dir).is_dir(), "file transport: mail folder not created")

    def wait_serving(self, process: subprocess.Popen, target: str, services: list[str], log_path: Path) -> None:
        deadline = time.monotonic() + 20
        last = "no answer"
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    self.test.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
                try:
                    statuses = {
                        s: stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=1).status for s in services
                    }
                    if all(v == health_pb2.HealthCheckResponse.SERVING for v in statuses.values()):
                        return
                    last = str({s: health_pb2.HealthCheckResponse.ServingStatus.Name(v) for s, v in statuses.items()})
                except grpc.RpcError as e:
                    last = f"{e.code()}: {e.details()}"
                    if e.code() == grpc.StatusCode.NOT_FOUND:
                        last += " (a probe asks for a health entry the binary does not register: see src/health.rs)"
                time.sleep(0.2)
        self.test.fail(f"not SERVING on {target} for {services} within 20 s ({last}):\n{log_path.read_text()}")

    def check_metrics(self, target: str) -> None:
        """The Prometheus endpoint the ServiceMonitor scrapes answers with the text format."""
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
            body = response.read().decode()
            self.test.assertEqual(response.status, 200)
            self.test.assertTrue(response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"])
        self.test.assertIn("# TYPE identity_", body, "no identity metrics on /metrics")

    def traced_call(self, target: str) -> str:
        """One health check in a sampled W3C trace (kept by every parent-based sampler); returns its trace id."""
        trace_id = secrets.token_hex(16)
        with grpc.insecure_channel(target) as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2,
                metadata=[("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")],
            )
        return trace_id

    def check_trace(self, collector: "FakeCollector", trace_id: str | None, env: dict[str, str]) -> None:
        """Spans flushed on shutdown reached the collector: service name, the caller's trace, the headers."""
        self.test.assertTrue(collector.requests, "no trace export reached the collector")
        body = b"".join(request for request, _ in collector.requests)
        self.test.assertIn(env.get("OTEL_SERVICE_NAME", "identity").encode(), body, "service.name")
        sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        if trace_id and sampler in ("always_on", "parentbased_always_on", "parentbased_traceidratio"):
            self.test.assertIn(bytes.fromhex(trace_id), body, "the RPC span does not continue the caller's trace")
        if "OTEL_EXPORTER_OTLP_HEADERS" in env:
            name, value = self.otlp_header
            self.test.assertTrue(all(metadata.get(name) == value for _, metadata in collector.requests),
                                 "OTEL_EXPORTER_OTLP_HEADERS not sent")

    def check_logs(self, output: str, env: dict[str, str]) -> None:
        self.test.assertNotIn("unknown configuration variable", output)
        if env.get("IDENTITY_LOG_FORMAT") == "json":
            for line in filter(str.strip, output.splitlines()):
                try:
                    json.loads(line)
                except ValueError:
                    self.test.fail(f"IDENTITY_LOG_FORMAT=json but a log line is not JSON: {line!r}")


class FakeCollector:
    """An OTLP/gRPC trace collector on a free loopback port, keeping each raw ExportTraceServiceRequest."""

    SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(self.export)  # raw bytes in and out
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.SERVICE, {"Export": handler}),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server.start()

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.requests.append((request, dict(context.invocation_metadata())))
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    def stop(self) -> None:
        self.server.stop(grace=None)


def main() -> int:
    program = unittest.main(module=__name__, exit=False, verbosity=2)
    result = program.result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f"helm: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
