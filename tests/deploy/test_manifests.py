"""The compose file, the Dockerfile and the Kubernetes manifests agree with the code.

No Docker engine or Kubernetes runs here; what can be checked without them is:
the files parse, every file they mount exists, every NWATCH_* variable they set
is a real setting with a valid value (loaded through ``streams.config``), the
ports and names they cross-reference match, and the security defaults hold.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from streams.alerts import hooks_from_settings
from streams.config import Settings
from tests.deploy.promql import DEPLOY, ROOT

K8S = DEPLOY / "k8s"


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(__import__("os").environ):
        if name.startswith("NWATCH_"):
            monkeypatch.delenv(name)
    unknown = [n for n in env if n.startswith("NWATCH_") and not _is_setting(n)]
    assert not unknown, f"not settings: {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def _is_setting(name: str) -> bool:
    parts = name.removeprefix("NWATCH_").lower().split("__")
    model = Settings
    for part in parts:
        if model is None:  # below a dict or a plain value: pydantic validates the rest
            return True
        fields = model.model_fields
        if part not in fields:
            return False
        model = fields[part].annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            model = None
            continue
    return True


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_the_stack_and_mounts_existing_files(compose):
    services = compose["services"]
    assert {"kafka", "kafka-init", "worker", "prometheus", "alertmanager", "grafana",
            "webhook-receiver"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), (name, src)
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # nothing published beyond loopback
    build = services["worker"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    kafka = services["kafka"]["environment"]
    assert "broker,controller" == kafka["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    # the topics the worker uses are the ones kafka-init creates
    created = re.search(r"for t in ([^;]+);", services["kafka-init"]["command"][0]).group(1).split()
    k = Settings().kafka
    assert set(created) == {*k.input_topics, k.scores_topic, k.anomalies_topic, k.drift_topic,
                            k.alerts_topic, k.dlq_topic, k.alerts_dlq_topic}


def test_compose_worker_settings_are_valid(compose, monkeypatch):
    s = settings_from_env(compose["services"]["worker"]["environment"], monkeypatch)
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.alerts.alertmanager_url is not None
    # Prometheus scrapes the worker service on the port the image serves
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "neighbourwatch"]
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert job["dns_sd_configs"][0]["port"] == 9650
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    url = am["receivers"][0]["webhook_configs"][0]["url"]
    assert url.startswith("http://webhook-receiver:8080/")


def test_dockerfile_installs_like_dev_and_runs_unprivileged():
    text = (DEPLOY / "Dockerfile").read_text()
    steps = [line for line in text.splitlines() if line.startswith(("RUN pip", "RUN python"))]
    torch = next(i for i, s in enumerate(steps) if "torch==2.13.0+cpu" in s)
    project = next(i for i, s in enumerate(steps) if "/src" in s and "torch" not in s and "-c" in s)
    assert torch < project  # torch first and alone
    assert re.search(r'pip install "pip==26\.3"', text)
    assert "-c /src/requirements.lock" in steps[torch] and "-c /src/requirements.lock" in steps[project]
    assert "torch==2.13.0+cpu" in (ROOT / "requirements.lock").read_text()
    for needed in ("HF_HUB_OFFLINE=1", "NWATCH_METRICS__HOST=0.0.0.0", "USER 10001", 'ENTRYPOINT ["/usr/bin/tini", "--", "nwatch"]',
                   'CMD ["run"]', "EXPOSE 9650"):
        assert needed in text, needed
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), src
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for src in ("models", "detectors", "streams", "pyproject.toml", "requirements.lock", "README.md"):
        assert f"!{src}" in ignore


def test_k8s_manifests_reference_each_other(monkeypatch):
    docs = k8s_docs()
    dep = docs["Deployment/neighbourwatch"]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # every object the Deployment names exists
    for source in container["envFrom"]:
        kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        assert f"{kind}/{ref['name']}" in docs
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    svc = docs["Service/neighbourwatch"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = container["ports"]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    monitor = docs["ServiceMonitor/neighbourwatch"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    # job label "neighbourwatch", as the rules expect
    assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "neighbourwatch"
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kustom["resources"]:
        assert (K8S / res).exists(), res

    env = {**docs["ConfigMap/neighbourwatch"]["data"], **docs["Secret/neighbourwatch"]["stringData"]}
    s = settings_from_env(env, monkeypatch)
    assert s.metrics.port == port["containerPort"]
    assert s.metrics.host == "0.0.0.0"  # scraped from outside the pod
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
    assert s.kafka.security_protocol == "SASL_SSL" and s.kafka.sasl_password is not None
    assert [h.name for h in hooks_from_settings(s.alerts)] == ["webhook", "alertmanager"]  # secret parses
    # the CA path the settings name is where the Secret is mounted
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(s.kafka.ssl_cafile).parent) in mounts


def test_k8s_security_defaults():
    docs = k8s_docs()
    pod = docs["Deployment/neighbourwatch"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    # secrets only through the Secret, never in the ConfigMap
    data = docs["ConfigMap/neighbourwatch"]["data"]
    assert not any(k.endswith(("PASSWORD", "SECRET", "WEBHOOK_URL")) for k in data)


def test_the_settings_check_catches_a_misspelt_variable(monkeypatch):
    with pytest.raises(AssertionError, match="not settings"):
        settings_from_env({"NWATCH_KAFKA__BOOTSTRAP_SERVER": "x:9092"}, monkeypatch)
    with pytest.raises(ValidationError):
        settings_from_env({"NWATCH_KAFKA__SECURITY_PROTOCOL": "SASL"}, monkeypatch)


def test_prometheusrule_is_a_copy_of_the_rules():
    rule = k8s_docs()["PrometheusRule/neighbourwatch"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]
