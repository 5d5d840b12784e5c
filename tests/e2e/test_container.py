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


SCALEOUT_PROJECT = "dnscale-e2e"  # fixed: the compose file's host ports are fixed too, and the images stay cached


@requires_shared_data
def test_compose_scaleout_processes_a_study_sent_half_to_each_receiver(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """deploy/compose-scaleout.yaml as written (ports 11112, 11113 and 8042 on this host, so not in CI): two
    receivers, two workers, PostgreSQL, Redis and Orthanc built and started; a real 2D T1 sent half to each receiver
    becomes one series in the journal, is processed by one job run once, and its results reach Orthanc once.

    Container name resolution needs podman's DNS: netavark with aardvark-dns, or CNI with the dnsname plugin
    (Debian: golang-github-containernetworking-plugin-dnsname). Builds with ``--isolation chroot --network host``
    (BUILDAH_ISOLATION=chroot unless set); a ``DICOM_NODE_WHEELHOUSE`` made with a newer Python than Debian's
    3.11.2 needs async-timeout added (redis requires it below 3.11.3)."""
    if PODMAN is None or COMPOSE is None:
        pytest.skip("podman and podman-compose are not installed (apt-get install podman podman-compose)")
    context = _build_context(tmp_path_factory.mktemp("scaleout"))
    secret_dir = context / "deploy" / "secrets"
    secret_dir.mkdir(mode=0o700)
    for name in ("journal_password", "broker_password"):
        (secret_dir / name).write_text(secrets.token_hex(24) + "\n")
        (secret_dir / name).chmod(0o644)  # read by the containers' own users
    env = {**os.environ, "BASE": BASE, "PIP_OPTIONS": "--no-index --find-links /src/wheelhouse" if WHEELHOUSE else ""}
    env.setdefault("BUILDAH_ISOLATION", "chroot")
    compose = [COMPOSE, "-p", SCALEOUT_PROJECT, "-f", str(context / "deploy" / "compose-scaleout.yaml"),
               "--podman-build-args=--isolation chroot --network host"]

    def run(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=context / "deploy")

    def logs() -> str:
        return "\n".join(f"== {service}\n" + service_logs(service)[-2000:] for service in (
            "postgres", "redis", "orthanc", "receiver-1", "receiver-2", "worker-1", "worker-2"))

    def service_logs(service: str) -> str:
        result = run("logs", service, timeout=60)
        return result.stdout + result.stderr

    def journal(sql: str) -> list[list[str]]:
        result = _podman("exec", f"{SCALEOUT_PROJECT}_postgres_1", "psql", "-X", "-q", "-A", "-t", "-F", "|",
                         "-d", "dicom_node", "-c", sql)
        return [line.split("|") for line in result.stdout.splitlines() if line]

    run("down", "-v", timeout=300)  # what an interrupted earlier run left
    built = run("build")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    up = run("up", "-d")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 300  # PostgreSQL's first start, then each node's `config check` and models
        for port in (11112, 11113):
            while echoscu(port, called_ae="DICOM_NODE", timeout=5).returncode != 0:
                assert time.monotonic() < deadline, f"port {port} did not answer C-ECHO:\n{logs()}"
                time.sleep(2)
        files = sorted(p for p in next((T1_2D / "HFS").iterdir()).rglob("*") if p.is_file())  # in slice order
        # each half is two slabs with a gap between them, so neither receiver finds the series whole on its own
        # (a contiguous half would be: evenly spaced, and no ImagesInAcquisition to say otherwise, so it would be
        # processed as version 1 and again, whole, as version 2); the second release finds all of it in the journal
        quarter = len(files) // 4
        halves = (files[:quarter] + files[2 * quarter:3 * quarter], files[quarter:2 * quarter] + files[3 * quarter:])
        for port, part in zip((11112, 11113), halves, strict=True):
            sent = storescu(port, part, called_ae="DICOM_NODE")
            assert sent.returncode == 0 and not failed_stores(sent), sent.stderr
        deadline = time.monotonic() + 900
        while not any(d.startswith("sT12DT1 summary") for d in _orthanc_series("http://127.0.0.1:8042")):
            assert time.monotonic() < deadline, logs()
            time.sleep(2)
        time.sleep(20)  # a second run of the job, if there were one, would deliver again meanwhile
        described = sorted(d.split(" QC")[0] for d in _orthanc_series("http://127.0.0.1:8042"))
        for expected in ("sT12DT1", "sT12DT1 SEG", "sT12DT1 volumes", "sT12DT1 summary"):
            assert described.count(expected) == 1, described
        received = journal("SELECT s.series_uid, count(i.sop_instance_uid) FROM series s"
                           " JOIN instances i ON i.series_uid = s.series_uid GROUP BY s.series_uid")
        assert [int(count) for _, count in received] == [len(files)], received  # one series, every instance
        jobs = journal("SELECT series_uid, rule, action, state, attempts, version FROM jobs ORDER BY id")
        assert jobs and len({tuple(j[:3]) for j in jobs}) == len(jobs), jobs  # each job made once
        assert all(j[0] == received[0][0] and j[4] == "1" for j in jobs), jobs  # ... and run once
        assert all(j[3] == "sent" for j in jobs), jobs  # its results delivered
        tracebacks = [s for s in ("receiver-1", "receiver-2", "worker-1", "worker-2") if "Traceback" in service_logs(s)]
        assert not tracebacks, logs()
    finally:
        run("down", "-v", timeout=300)
        _podman("network", "rm", "-f", f"{SCALEOUT_PROJECT}_default", check=False)  # podman-compose 1.0 leaves it
