"""The container image (deploy/Containerfile) built with Debian's podman and run as hospital IT would: a real 2D T1
sent by dcmtk to the node in the container, its sT1 and volumetry delivered to an Orthanc on the host.

Heavy (not in CI): the build installs the node and its dependencies (minutes) and needs either network access
for the base image and PyPI, or, offline:

- ``DICOM_NODE_BASE_IMAGE``: a Debian 12 image podman has (e.g. imported from ``debootstrap``, see
  deploy/Containerfile); default ``docker.io/library/debian:12-slim``;
- ``DICOM_NODE_WHEELHOUSE``: a wheelhouse made by deploy/wheelhouse.sh (installs without PyPI).

On a host whose podman cannot set its default resource limits or use systemd cgroups (a container or a VM
sandbox), point ``CONTAINERS_CONF`` at a containers.conf with ``runtime = "runc"``, ``cgroup_manager =
"cgroupfs"`` and ``default_ulimits`` within the host's limits; the test passes the environment on to podman.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, requires_shared_data

from .node_proc import config_toml
from .peers import echoscu, failed_stores, free_port, storescu

pytestmark = [pytest.mark.heavy, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
PODMAN = shutil.which("podman")
BASE = os.environ.get("DICOM_NODE_BASE_IMAGE", "docker.io/library/debian:12-slim")
WHEELHOUSE = os.environ.get("DICOM_NODE_WHEELHOUSE")
T1_2D = SHARED_DATA / "dicom" / "human_siemens_prisma_t1_2d_4mm"


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _build_context(folder: Path) -> Path:
    """The working tree as git sees it (tracked and untracked files that are not ignored), plus the wheelhouse."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if WHEELHOUSE:
        shutil.copytree(WHEELHOUSE, folder / "wheelhouse")
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PODMAN is None:
        pytest.skip("podman is not installed (apt-get install podman)")
    tag = f"localhost/dicom-node-e2e:{secrets.token_hex(4)}"
    context = _build_context(tmp_path_factory.mktemp("context"))
    args = ["build", "--isolation", "chroot", "--network", "host", "-f", "deploy/Containerfile",
            "--build-arg", f"BASE={BASE}", "-t", tag]
    if WHEELHOUSE:
        args += ["--build-arg", "PIP_OPTIONS=--no-index --find-links /src/wheelhouse"]
    _podman(*args, str(context), timeout=3600)
    yield tag
    _podman("rmi", "-f", tag, check=False)


@requires_shared_data
def test_the_image_runs_the_node_and_its_results_reach_the_pacs(image: str, orthanc, tmp_path: Path) -> None:  # noqa: ANN001
    port, http_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(config_toml({
        "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": port, "data_dir": "/var/lib/dicom-node",
                 "idle_timeout_s": 5.0},
        "http": {"host": "127.0.0.1", "port": http_port},
        "destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    }))
    config.chmod(0o644)
    name = f"dicom-node-e2e-{secrets.token_hex(4)}"
    volume = f"{name}-data"
    _podman("volume", "create", volume)
    try:
        _podman("run", "-d", "--name", name, "--network", "host", "-v", f"{config}:/etc/dicom-node/node.toml:ro",
                "-v", f"{volume}:/var/lib/dicom-node", image)
        deadline = time.monotonic() + 300  # `config check`, then the models are loaded
        while echoscu(port, called_ae="DICOM_NODE", timeout=5).returncode != 0:
            logs = _podman("logs", name, check=False)
            assert time.monotonic() < deadline, f"the node did not answer C-ECHO:\n{logs.stdout}{logs.stderr}"
            assert _podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true", logs.stderr
            time.sleep(1)
        files = sorted(p for p in next((T1_2D / "HFS").iterdir()).rglob("*") if p.is_file())
        sent = storescu(port, files, called_ae="DICOM_NODE")
        assert sent.returncode == 0 and not failed_stores(sent), sent.stderr
        orthanc.wait_for_series(r"^sT12DT1 summary", timeout=900)  # the last object the job writes
        status = _podman("exec", name, "/opt/dicom-node/bin/dicom-node", "status", "--json", check=False)
        report = json.loads(status.stdout)
        assert report["node"]["running"] and not report["node"]["unhealthy"], status.stdout
        described = {s["MainDicomTags"].get("SeriesDescription", "").split(" QC")[0] for s in orthanc.all_series()}
        assert {"sT12DT1", "sT12DT1 SEG", "sT12DT1 volumes", "sT12DT1 summary"} <= described, described
        _podman("stop", "-t", "30", name)
        logs = _podman("logs", name).stderr
        assert "Traceback" not in logs and "signal 15: stopping" in logs, logs[-4000:]
    finally:
        _podman("rm", "-f", name, check=False)
        _podman("volume", "rm", "-f", volume, check=False)


COMPOSE = shutil.which("podman-compose")


def _orthanc_series(url: str) -> list[str]:
    import base64
    import urllib.request

    request = urllib.request.Request(f"{url}/series?expand", headers={
        "Authorization": "Basic " + base64.b64encode(b"orthanc:orthanc").decode()})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return [s["MainDicomTags"].get("SeriesDescription", "") for s in json.loads(response.read())]
    except OSError:
        return []


@requires_shared_data
def test_compose_runs_the_node_beside_orthanc(tmp_path_factory: pytest.TempPathFactory) -> None:
    """deploy/compose.yaml as written (ports 11112 and 8042 on this host, so not in CI): both images built, the
    node sends a real 2D T1's results to the compose file's Orthanc over the compose network."""
    if PODMAN is None or COMPOSE is None:
        pytest.skip("podman and podman-compose are not installed (apt-get install podman podman-compose)")
    context = _build_context(tmp_path_factory.mktemp("compose"))
    env = {**os.environ, "BASE": BASE, "PIP_OPTIONS": "--no-index --find-links /src/wheelhouse" if WHEELHOUSE else ""}
    compose = [COMPOSE, "-p", f"dn{secrets.token_hex(3)}", "-f", str(context / "deploy" / "compose.yaml")]

    def run(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=context / "deploy")

    up = run("up", "-d")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 300
        while echoscu(11112, called_ae="DICOM_NODE", timeout=5).returncode != 0:
            assert time.monotonic() < deadline, run("logs").stdout[-4000:]
            time.sleep(1)
        files = sorted(p for p in next((T1_2D / "HFS").iterdir()).rglob("*") if p.is_file())
        sent = storescu(11112, files, called_ae="DICOM_NODE")
        assert sent.returncode == 0 and not failed_stores(sent), sent.stderr
        deadline = time.monotonic() + 900
        while not any(d.startswith("sT12DT1 summary") for d in _orthanc_series("http://127.0.0.1:8042")):
            assert time.monotonic() < deadline, run("logs").stdout[-4000:]
            time.sleep(2)
        described = {d.split(" QC")[0] for d in _orthanc_series("http://127.0.0.1:8042")}
        assert {"sT12DT1", "sT12DT1 SEG", "sT12DT1 volumes", "sT12DT1 summary"} <= described, described
    finally:
        run("down", "-v", timeout=300)
