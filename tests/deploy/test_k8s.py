"""deploy/k8s: every manifest validates against the Kubernetes schemas, and the parts fit together.

The schemas are the ones kubernetes-validate ships for K8S_VERSION (offline, no cluster);
strict mode rejects properties the schema does not know, so a misspelt field is an error.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.files import K8S, K8S_VERSION, ROOT, dockerfile, manifests, only, tool


def resource(kind: str) -> dict[str, Any]:
    found = [m for m in manifests().values() if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def embedded_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(resource("ConfigMap")["data"]["relay.yaml"])
    return config


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_validates_strictly(name: str) -> None:
    """The manifest is valid for the pinned Kubernetes version, with no unknown fields."""
    try:
        version = kubernetes_validate.validate(manifests()[name], K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {exc.message}", pytrace=False)
    assert version == ".".join(K8S_VERSION.split(".")[:2])


def test_validation_is_live() -> None:
    """A misspelt probe field and an unknown kind are rejected, not waved through."""
    deployment = resource("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    probe = broken["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = {**deployment, "kind": "Deploymnet"}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_cli_validates_what_make_lint_validates() -> None:
    """The kubernetes-validate CLI make lint runs passes on the manifests, with the same version."""
    files = [str(K8S / name) for name in sorted(manifests())]
    result = tool("kubernetes-validate", "--kubernetes-version", K8S_VERSION, "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(files), result.stdout
    makefile = (ROOT / "Makefile").read_text()
    assert f"K8S_VERSION := {K8S_VERSION}\n" in makefile


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml names exactly the manifests of the directory, and the image."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(manifests())
    assert [i["name"] for i in kustomization["images"]] == [container()["image"].split(":")[0]]


def test_the_resources() -> None:
    """A Deployment, a Service, a ConfigMap and a PodDisruptionBudget; no Secret values."""
    kinds = sorted(m["kind"] for m in manifests().values())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]


def test_two_replicas_and_selectors_that_match_the_pods() -> None:
    """Two replicas; the Deployment, Service and PDB select the pod template's labels."""
    deployment = resource("Deployment")
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        resource("Service")["spec"]["selector"],
        resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    assert resource("PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_container_runs_the_image_command_on_the_mounted_config() -> None:
    """args is the image's CMD; the path it names is where the ConfigMap's relay.yaml is mounted."""
    args = container()["args"]
    assert args == only(dockerfile(), "CMD").exec_form()
    assert "command" not in container(), "the image's ENTRYPOINT (ctct-relay) must stay"
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
    items = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert args[args.index("--config") + 1] == f"{mount['mountPath']}/{items['relay.yaml']}"
    assert mount["readOnly"] is True


def test_probes_on_the_admin_port() -> None:
    """Liveness on /healthz, readiness on /readyz, on the port the config's admin API listens on."""
    c = container()
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["admin"] == embedded_config()["admin"]["port"]
    assert str(ports["admin"]) == only(dockerfile(), "EXPOSE").args
    assert embedded_config()["admin"]["host"] == "0.0.0.0"  # probes come from the kubelet
    service_port = resource("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == "admin"


def test_no_service_link_variables() -> None:
    """The kubelet gives a pod CTCT_RELAY_SERVICE_HOST, CTCT_RELAY_PORT_8081_TCP, … for the
    Service ctct-relay unless enableServiceLinks is false, and the relay reads every CTCT_RELAY_*
    variable as a config key: it stopped at start-up on unknown keys port, service_host, …"""
    assert resource("Service")["metadata"]["name"] == "ctct-relay"
    assert pod_spec()["enableServiceLinks"] is False


def test_resources_and_security_context() -> None:
    """Requests and limits set; non-root as the image's uid, read-only root, no privileges."""
    c = container()
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    uid = only(dockerfile(), "USER").args.split(":")[0]
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # the only writable places are the emptyDirs
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    empty_dirs = {v["name"] for v in pod_spec()["volumes"] if "emptyDir" in v}
    assert {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")} == empty_dirs
    assert "/tmp" in writable  # noqa: S108 - the container's own /tmp, an emptyDir


def test_secrets_come_from_secret_key_refs() -> None:
    """Every ${VAR} the embedded config requires is set from the Secret, never as a literal."""
    text = resource("ConfigMap")["data"]["relay.yaml"]
    required = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert required == {
        "POSTGRES_PASSWORD",
        "CTCT_API_KEY",
        "CTCT_ACCESS_TOKEN",
        "CTCT_RELAY_ADMIN_TOKEN",
    }
    env = {e["name"]: e for e in container()["env"]}
    assert required <= set(env)
    for name in required:
        assert "value" not in env[name], f"{name} is written into the manifest"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "ctct-relay"
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values()}
    assert keys == {"api-key", "access-token", "admin-token", "postgres-password"}


def test_embedded_config_uses_postgresql_state() -> None:
    """Two replicas need the shared PostgreSQL state, not a per-pod SQLite file."""
    assert embedded_config()["state"].startswith("postgresql://")
