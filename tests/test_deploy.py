"""deploy/: the Kubernetes manifests and the Dockerfile, checked without a cluster.

Every manifest against the Kubernetes schemas (kubernetes-validate ships them: strict, so an
unknown or misspelt field is an error); each ConfigMap's grayproxy config through
`grayproxy check`; the manifests against that config (the ports, the probes, the token, the
writable directory); the security context of every container; the Dockerfile through hadolint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import proxy
from proxy.config import Config
from proxy.loader import load_config

from procs import REPO_ROOT, run_cli, tool

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
EXAMPLES = sorted(path.name for path in KUBERNETES.iterdir() if path.is_dir())
MANIFESTS = sorted(
    path for path in KUBERNETES.glob("*/*.yaml") if path.name != "kustomization.yaml"
)
CONFIG_FILE = "grayproxy.yaml"  # the ConfigMap key, so the file name in the mounted directory
TOKEN = "a-test-token"


def dockerfile_uid() -> int:
    """The numeric user the image runs as (`USER 10001:10001`)."""
    match = re.search(r"^USER (\d+)", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match is not None, "the Dockerfile names no numeric USER"
    return int(match[1])


DOCKERFILE_UID = dockerfile_uid()


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources(example: str) -> list[dict[str, Any]]:
    return [
        doc for path in sorted((KUBERNETES / example).glob("*.yaml")) for doc in documents(path)
    ]


def one(example: str, kind: str) -> dict[str, Any]:
    found = [doc for doc in resources(example) if doc["kind"] == kind]
    assert len(found) == 1, f"{example}: {len(found)} {kind}s"
    return found[0]


def grayproxy_container(example: str) -> dict[str, Any]:
    containers = one(example, "Deployment")["spec"]["template"]["spec"]["containers"]
    [container] = [c for c in containers if c["image"].startswith("grayproxy:")]
    result: dict[str, Any] = container
    return result


def token_env(container: dict[str, Any]) -> str:
    """The environment variable the container gets from a Secret."""
    [name] = [e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    result: str = name
    return result


def embedded_config(example: str, directory: Path) -> Path:
    """The ConfigMap's grayproxy config, written to `directory`. Its `state_file` (a path in
    the pod's emptyDir) is moved into `directory`, the one change made."""
    text = one(example, "ConfigMap")["data"][CONFIG_FILE]
    state_dir = state_file_dir(text)
    if state_dir is not None:
        text = text.replace(f"state_file: {state_dir}/", f"state_file: {directory}/")
    path = directory / CONFIG_FILE
    path.write_text(text)
    return path


def state_file_dir(config_text: str) -> str | None:
    match = re.search(r"^state_file: (\S+)$", config_text, re.MULTILINE)
    return None if match is None else str(PurePosixPath(match[1]).parent)


def load_embedded(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv(token_env(grayproxy_container(example)), TOKEN)
    return load_config(str(embedded_config(example, tmp_path)))


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port given by number or by name, as a probe or a Service's targetPort gives it."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    result: int = number
    return result


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in documents(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_kustomization_lists_every_manifest(example: str) -> None:
    kustomization = documents(KUBERNETES / example / "kustomization.yaml")[0]
    files = {p.name for p in MANIFESTS if p.parent.name == example}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_configmap_passes_grayproxy_check(example: str, tmp_path: Path) -> None:
    path = embedded_config(example, tmp_path)
    variable = token_env(grayproxy_container(example))
    checked = run_cli("check", "-c", str(path), env={variable: TOKEN})
    assert checked.returncode == 0, checked.stderr
    assert ": OK: " in checked.stdout
    # The token is the Secret's: without it, the config is refused.
    refused = run_cli("check", "-c", str(path), env={variable: None})
    assert refused.returncode == 2
    assert variable in refused.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_ports_probes_and_token_agree_with_the_config(
    example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_embedded(example, tmp_path, monkeypatch)
    container = grayproxy_container(example)
    assert container_port(container, "http") == config.listen.port
    assert container_port(container, "control") == config.control.listen.port
    assert config.control.listen.host == "0.0.0.0"  # the kubelet probes the pod's address
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert container_port(container, get["port"]) == config.control.listen.port
    assert config.control.token == TOKEN, "a control API on the pod's address needs a token"
    # Clients go to the data port.
    services = [doc for doc in resources(example) if doc["kind"] == "Service"]
    data = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert [container_port(container, s["spec"]["ports"][0]["targetPort"]) for s in data] == [
        config.listen.port
    ]


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_config_is_watched_from_a_configmap_directory(example: str) -> None:
    """Mounted as a whole directory (a subPath mount never sees an update), run with --watch."""
    container = grayproxy_container(example)
    pod = one(example, "Deployment")["spec"]["template"]["spec"]
    args = container["args"]
    assert args[0] == "run" and "--watch" in args
    config_path = PurePosixPath(args[args.index("-c") + 1])
    assert config_path.name in one(example, "ConfigMap")["data"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert "subPath" not in mount
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == one(example, "ConfigMap")["metadata"]["name"]


def test_the_gateway_is_a_fleet_behind_its_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = one("gateway", "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = one("gateway", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {
        s["metadata"]["name"]: s["spec"] for s in resources("gateway") if s["kind"] == "Service"
    }
    assert all(spec["selector"].items() <= labels.items() for spec in services.values())
    # The headless Service: its name resolves to every replica, for `ctl --url dns+http://`.
    config = load_embedded("gateway", tmp_path, monkeypatch)
    [control] = [spec for spec in services.values() if spec.get("clusterIP") == "None"]
    [port] = control["ports"]
    assert port["port"] == config.control.listen.port
    assert container_port(grayproxy_container("gateway"), port["targetPort"]) == port["port"]
    # SIGTERM: the pause before it, then the drain, end before the kubelet kills.
    pause = int(grayproxy_container("gateway")["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + config.drain_timeout


def test_the_state_file_is_on_a_writable_volume() -> None:
    """The root filesystem is read-only: the state file's directory is an emptyDir."""
    state_dir = state_file_dir(one("gateway", "ConfigMap")["data"][CONFIG_FILE])
    assert state_dir is not None
    container = grayproxy_container("gateway")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert not mount.get("readOnly", False)
    pod = one("gateway", "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def containers() -> list[Any]:
    """Every Deployment's containers, each with its pod's spec, named example/container."""
    found = []
    for example in EXAMPLES:
        pod = one(example, "Deployment")["spec"]["template"]["spec"]
        found += [pytest.param(c, pod, id=f"{example}/{c['name']}") for c in pod["containers"]]
    return found


@pytest.mark.parametrize(("container", "pod"), containers())
def test_every_container_runs_locked_down(container: dict[str, Any], pod: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == pod["securityContext"]["runAsUser"] == DOCKERFILE_UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for bound in ("requests", "limits"):
        assert set(container["resources"][bound]) == {"cpu", "memory"}


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_image_is_this_version(example: str) -> None:
    assert grayproxy_container(example)["image"] == f"grayproxy:{proxy.__version__}"


def test_the_dockerfile_passes_hadolint() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if os.access(beside_python, os.X_OK) else tool("hadolint")
    linted = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")
