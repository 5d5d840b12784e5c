"""The installation hospital IT repeats: a regular (non-editable) wheel carries the bundled models, installs into a
fresh virtual environment without network, and the node it installs finds its models and serves the scout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

from tests.conftest import SHARED_DATA, requires_shared_data
from tests.e2e.node_proc import config_toml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
MODELS = sorted(p.parent.name for p in (REPO / "onnx_models").glob("*/manifest.toml"))


def test_the_package_list_is_complete() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set(find_namespace_packages(where=str(REPO), include=["dicom_node*", "inference*"]))
    # folders of Python modules; data folders (e.g. inference/training/runs, the committed training state) are not
    # packages and do not ship
    found = {p for p in found if "__pycache__" not in p and any((REPO / p.replace(".", "/")).glob("*.py"))}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_license_and_notices_ship() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    notices = (REPO / "THIRD_PARTY_NOTICES.md").read_text()
    for model in MODELS:
        assert f"`{model}`" in notices, f"{model} is not in THIRD_PARTY_NOTICES.md"
        licence = REPO / "onnx_models" / model / "LICENSE"
        if licence.exists():  # a third-party model's licence is reproduced whole
            assert licence.read_text().strip() in notices


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL", "PIP_FIND_LINKS")}
    return subprocess.run(args, capture_output=True, text=True, check=False, env=env, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy: pip builds in the source tree (build/, *.egg-info), which stays untouched this way
    source = tmp_path_factory.mktemp("source") / "dicom-node"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "wheelhouse"))
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--no-cache-dir", "--wheel-dir", str(out), str(source)], timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("dicom_node-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed from a file, no index (its dependencies come from this
    interpreter's site-packages: this machine has no network; tests marked heavy install them offline too)."""
    env_dir = tmp_path_factory.mktemp("venv") / "dicom-node"
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(env_dir)
    python = env_dir / "bin" / "python"
    done = _run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", str(wheel)],
                timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return python


def test_the_compose_configuration_is_ready(capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/compose.yaml's node configuration passes ``config check`` with the bundled models."""
    from dicom_node.cli import main

    assert main(["config", "check", "--config", str(REPO / "deploy" / "compose-node.toml")]) == 0
    assert "destination orthanc: ORTHANC@orthanc:4242" in capsys.readouterr().out


def test_the_wheel_carries_every_bundled_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in MODELS:
        for item in sorted((REPO / "onnx_models" / model).iterdir()):
            assert f"dicom_node/bundled_models/{model}/{item.name}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.endswith(".dist-info/licenses/THIRD_PARTY_NOTICES.md") for n in names)


def test_the_installed_node_finds_its_models(installed: Path, tmp_path: Path) -> None:
    where = _run([str(installed), "-c", "import dicom_node, dicom_node.config as c; "
                  "print(dicom_node.__file__); print(c.BUNDLED_MODELS_DIR)"], cwd=tmp_path, timeout=120)
    assert where.returncode == 0, where.stderr
    module, models_dir = where.stdout.split()
    env_dir = installed.parents[1]
    assert Path(module).is_relative_to(env_dir) and Path(models_dir).is_relative_to(env_dir)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[[destinations]]\nname = "pacs"\n'
                      'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    check = _run([str(env_dir / "bin" / "dicom-node"), "config", "check", "--config", str(config)], cwd=tmp_path,
                 timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"models in {models_dir}: {', '.join(MODELS)}" in check.stdout
    assert "DISABLED" not in check.stdout


SCOUT = SHARED_DATA / "dicom" / "phantom_siemens_xa30_aahead_scout" / "01001_AAHead_Scout"


@requires_shared_data
def test_the_installed_node_serves_the_scout(installed: Path, tmp_path: Path) -> None:
    """The wheel's node, its bundled models as installed, turns the AutoAlign scout into sT1AAH in Orthanc."""
    from tests.e2e.node_proc import NodeProcess
    from tests.e2e.peers import Orthanc, failed_stores, storescu

    models_dir = _run([str(installed), "-c", "import dicom_node.config as c; print(c.BUNDLED_MODELS_DIR)"],
                      cwd=tmp_path, timeout=120).stdout.strip()
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
    try:
        dest = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        with NodeProcess(tmp_path / "node", models_dir=Path(models_dir), destinations=[dest],
                         python=str(installed)) as node:
            sent = storescu(node.port, SCOUT, called_ae=node.ae_title)
            assert sent.returncode == 0 and not failed_stores(sent), sent.stderr
            orthanc.wait_for_series("^sT1AAH$", timeout=900)
            assert f"models installed in {models_dir}: " in node.log()
    finally:
        orthanc.stop()


@pytest.mark.heavy
def test_offline_install_from_a_wheelhouse(tmp_path: Path) -> None:
    """deploy/wheelhouse.sh builds the wheelhouse (needs PyPI), then a clean virtual environment (no system
    site-packages) installs from it with --no-index and runs ``config check``."""
    wheelhouse = tmp_path / "wheelhouse"
    built = _run(["bash", str(REPO / "deploy" / "wheelhouse.sh"), str(wheelhouse)], timeout=1800)
    if built.returncode != 0 and ("NewConnectionError" in built.stderr or "No matching distribution" in built.stderr):
        pytest.skip("deploy/wheelhouse.sh needs access to PyPI to collect the dependencies")
    assert built.returncode == 0, built.stderr[-3000:]
    env_dir = tmp_path / "clean"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    done = _run([str(env_dir / "bin" / "pip"), "install", "--no-index", "--find-links", str(wheelhouse), "dicom-node"],
                timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    config = tmp_path / "node.toml"
    config.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
                      f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    check = _run([str(env_dir / "bin" / "dicom-node"), "config", "check", "--config", str(config)], cwd=tmp_path,
                 timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_scaleout_compose_file_runs_receivers_workers_and_their_services(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/compose-scaleout.yaml (issue 16): two receivers, two workers, PostgreSQL, Redis and Orthanc, every node
    on the one shared data volume and configuration, each service built from a file of deploy/; its node
    configuration passes ``config check`` (once its secrets exist)."""
    import yaml

    from dicom_node.cli import main

    deploy = REPO / "deploy"
    compose = yaml.safe_load((deploy / "compose-scaleout.yaml").read_text())
    services = compose["services"]
    roles = {name: s.get("command", []) for name, s in services.items() if name.startswith(("receiver", "worker"))}
    assert roles == {"receiver-1": ["--role", "receiver"], "receiver-2": ["--role", "receiver"],
                     "worker-1": ["--role", "worker"], "worker-2": ["--role", "worker"]}
    for name in roles:
        node = services[name]
        assert "node-data:/var/lib/dicom-node" in node["volumes"]
        assert "./compose-scaleout.toml:/etc/dicom-node/node.toml:ro" in node["volumes"]
        assert node["build"]["args"]["EXTRAS"] == "[scale]" and set(node["depends_on"]) >= {"postgres", "redis"}
    for name in ("postgres", "redis", "orthanc"):
        assert (deploy / services[name]["build"]["dockerfile"]).is_file()
    assert (REPO / services["receiver-1"]["build"]["dockerfile"]).is_file()
    assert {p.split(":")[0] for n in ("receiver-1", "receiver-2") for p in services[n]["ports"]} == {"11112", "11113"}
    # the configuration, with the secrets where the compose file mounts them
    config = tomllib.loads((deploy / "compose-scaleout.toml").read_text())
    assert config["journal"]["backend"] == "postgresql" and config["executor"]["kind"] == "celery"
    for section, key in (("journal", "password_file"), ("executor", "broker_password_file")):
        secret = tmp_path / key
        secret.write_text("s3cret-of-24-characters\n")
        secret.chmod(0o600)
        config[section][key] = str(secret)
    config["node"]["data_dir"] = str(tmp_path / "data")
    local = tmp_path / "node.toml"
    local.write_text(config_toml(config))
    assert main(["config", "check", "--config", str(local)]) == 0
    assert "destination orthanc: ORTHANC@orthanc:4242" in capsys.readouterr().out
