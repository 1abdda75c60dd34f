"""Kubernetes and the image: the example overlay rendered by kustomize, every object validated strictly,
the replica count the one number to raise, probes, shutdown timing, secrets; the Dockerfile built where
a container engine works."""

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from coordinator.core.values import parse_duration
from testkit.polling import wait_blocking
from testkit.procs import ROOT, free_port

K8S = ROOT / "deploy" / "kubernetes"
OVERLAY = K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on
IDLE_BYTES, PER_CONNECTION_BYTES = 55e6, 2.9e3  # measured: docs/deployment.md
CONNECTION_BUDGET = 10_000
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}

kubectl = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(kubectl is None, reason="kubectl not installed (Debian's kubernetes-client; "
                                                        "scripts/bootstrap.sh installs it)")


def kustomize_version() -> tuple[int, ...]:
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0)


def render(path: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def quantity(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?|k)?", str(text))
    assert m, text
    return float(m.group(1)) * UNITS.get(m.group(2) or "", 1)


@pytest.fixture(scope="module", autouse=True)
def modern_kustomize():
    version = kustomize_version()
    if version < (4, 1):  # `labels:` and `replicas:` in the kustomizations
        pytest.skip(f"{kubectl} bundles kustomize {'.'.join(map(str, version))}; the overlay needs kustomize >= 4.1 "
                    "(kubectl >= 1.22)")


@pytest.fixture(scope="module")
def objects():
    return render(OVERLAY)


def test_every_object_validates_strictly(objects):
    import kubernetes_validate

    kinds = sorted(o["kind"] for o in objects)
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount", "Ingress"} <= set(kinds)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises with the path of the error
    print(f"validated {len(objects)} objects against Kubernetes {KUBERNETES_VERSION} (strict): {', '.join(kinds)}")


def test_replicas_is_the_one_number_to_raise(tmp_path, objects):
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    shutil.copytree(K8S, tmp_path / "kubernetes")
    scaled = tmp_path / "kubernetes" / OVERLAY.relative_to(K8S)
    kustomization = scaled / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("count: 3") == 1
    kustomization.write_text(text.replace("count: 3", "count: 7"))
    scaled_objects = render(scaled)
    assert one(scaled_objects, "Deployment")["spec"]["replicas"] == 7
    # everything else is the same: the PDB and the Service follow without edits
    strip = lambda objs: [o for o in objs if o["kind"] != "Deployment"]  # noqa: E731
    assert strip(scaled_objects) == strip(objects)
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]


def test_pod_ip_feeds_the_relay_url_and_probes_and_shutdown(objects):
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = container["env"]
    names = [e["name"] for e in env]
    values = {e["name"]: e for e in env}
    assert values["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    relay = values["COORDINATOR_DERP_SERVER_RELAY_URL"]["value"]
    assert relay.startswith("http://$(POD_IP):") and names.index("POD_IP") < names.index("COORDINATOR_DERP_SERVER_RELAY_URL")
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert relay == f"http://$(POD_IP):{port['http']}" and values["COORDINATOR_ADDRESS"]["value"] == f"*:{port['http']}"
    assert values["COORDINATOR_PROMETHEUS_ADDRESS"]["value"] == f"*:{port['metrics']}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM comes after preStop; the replica needs its shutdown timeout; then SIGKILL
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    shutdown = parse_duration(values["COORDINATOR_SHUTDOWN_TIMEOUT"]["value"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + shutdown + 1, (grace, pre_stop, shutdown)
    print(f"preStop {pre_stop:g} s + shutdown {shutdown:g} s <= terminationGracePeriodSeconds {grace} s")
    # the secrets: Postgres URL required, mesh key and token optional (Postgres has them otherwise)
    for var, key, optional in (("COORDINATOR_PG_CONNECTION_URL", "pg-url", False),
                               ("COORDINATOR_DERP_MESH_KEY", "mesh-key", True), ("COORDINATOR_API_TOKEN", "api-token", True)):
        ref = values[var]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == key and ref.get("optional", False) is optional
    assert not any("value" in e and e["name"] in ("COORDINATOR_DERP_MESH_KEY", "COORDINATOR_API_TOKEN") for e in env)
    # selectors: the Service and the PDB select exactly the pods
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = one(objects, kind)
        selector = obj["spec"]["selector"].get("matchLabels", obj["spec"]["selector"])
        assert selector.items() <= labels.items(), (kind, selector, labels)
    assert one(objects, "Deployment")["metadata"]["namespace"] == "coordinator"
    assert container["image"] == "registry.example.com/coordinator:0.1.0"


def test_resources_sized_from_measured_memory_and_pod_hardened(objects):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    request = quantity(container["resources"]["requests"]["memory"])
    limit = quantity(container["resources"]["limits"]["memory"])
    needed = IDLE_BYTES + PER_CONNECTION_BYTES * CONNECTION_BUDGET
    print(f"memory request {request / 2**20:.0f} Mi >= {needed / 1e6:.0f} MB "
          f"(idle {IDLE_BYTES / 1e6:.0f} MB + {CONNECTION_BUDGET} x {PER_CONNECTION_BYTES / 1e3:.1f} KB); limit {limit / 2**20:.0f} Mi")
    assert needed <= request <= 4 * needed and limit >= request
    assert "cpu" not in container["resources"].get("limits", {})  # throttling would add latency against the 10 ms limit
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_dockerfile_is_multi_stage_non_root_and_matches_the_manifests():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert stages == ["build", "runtime"], stages
    runtime = text.split("AS runtime", 1)[1]
    assert "gcc" not in runtime and re.search(r"^USER 10001", runtime, flags=re.M)
    assert "EXPOSE 3000 2112" in runtime
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def container_engine() -> tuple[str | None, str]:
    """(engine, '') if docker or podman can build here, else (None, why not)."""
    reasons = []
    for engine in ("podman", "docker"):
        path = shutil.which(engine)
        if path is None:
            reasons.append(f"{engine}: not installed")
            continue
        info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return path, ""
        reasons.append(f"{engine}: {(info.stderr or info.stdout).strip().splitlines()[-1]}")
    return None, "; ".join(reasons)


def base_images() -> list[str]:
    """The images the Dockerfile builds FROM, its ARG defaults filled in (stage names left out)."""
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
              for image in re.findall(r"^FROM (\S+)", text, re.M)]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    return sorted(set(images) - stages)


def missing_base_image(engine: str) -> str | None:
    """Why a base image cannot be had (not here and cannot be pulled), or None when every one can."""
    for image in base_images():
        if subprocess.run([engine, "image", "inspect", image], capture_output=True, timeout=60).returncode == 0:
            continue
        pull = subprocess.run([engine, "pull", image], capture_output=True, text=True, timeout=600)
        if pull.returncode != 0:
            last = (pull.stderr or pull.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"the base image {image} is not on this machine and cannot be pulled ({last[0]})"
    return None


@pytest.fixture
def engine():
    path, why = container_engine()
    if path is None:
        pytest.skip(f"no working container engine on this machine, the image is not built here ({why})")
    if (why := missing_base_image(path)) is not None:
        pytest.skip(f"the image is not built here: {why}")
    return path


@pytest.mark.timeout(1800)
def test_image_builds_and_serves(engine, pg_url):
    tag = f"coordinator-test:{int(time.time())}"
    build = subprocess.run([engine, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stderr[-4000:]
    port = free_port()
    name = f"coordinator-test-{port}"
    try:
        subprocess.run([engine, "run", "-d", "--rm", "--name", name, "--network", "host",
                        "-e", f"COORDINATOR_ADDRESS=127.0.0.1:{port}", "-e", f"COORDINATOR_PG_CONNECTION_URL={pg_url}",
                        tag], check=True, capture_output=True, timeout=120)
        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return resp.status == 200

        wait_blocking(ready, 60, "the container's replica to become ready", 0.5, ignore=(OSError,))
        user = subprocess.run([engine, "exec", name, "id", "-u"], capture_output=True, text=True, check=True).stdout
        assert user.strip() == "10001"
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=120)
