"""Fixtures for end-to-end tests: a fresh Orthanc, a dcmtk storescp, a folder for DICOM files.

Every test here is marked ``e2e``. Without dcmtk, Orthanc or dciodvfy the tests skip, except in CI
(``CI`` set to true), where they fail: a broken install must not pass silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.node_proc import SYNTH_MODEL
from tests.e2e.peers import Orthanc, StoreSCP, require_tools
from tests.onnx_fixtures import make_synthesis_model

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _e2e_tools_installed() -> None:
    """Skip (locally) or fail (CI) when a peer executable is missing."""
    require_tools()


@pytest.fixture
def dicom_tmp(tmp_path: Path) -> Path:
    """An empty folder for DICOM files a test writes."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    return folder


OrthancFactory = Callable[..., Orthanc]


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start Orthancs with chosen settings (e.g. ``modalities={"NODE": ["NODE", "127.0.0.1", port]}``).

    Each lives in tmp_path (config, storage and log stay there for inspection) and is stopped at teardown.
    """
    started: list[Orthanc] = []

    def start(**kwargs: object) -> Orthanc:
        workdir = tmp_path / f"orthanc-{len(started)}"
        server = Orthanc(workdir=workdir, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Orthanc:
    """A fresh, empty Orthanc (AET ORTHANC) with no modalities; add peers with ``add_modality``."""
    return orthanc_factory()


@pytest.fixture
def store_scp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AET STORESCP) writing into tmp_path/storescp; ``stop()``/``start()`` at will."""
    scp = StoreSCP(tmp_path / "storescp")
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one fixture synthesis model, ``SYNTH_MODEL`` (a module may define its own instead)."""
    folder = tmp_path_factory.mktemp("models")
    make_synthesis_model(folder, model_id=SYNTH_MODEL, tile=(16, 16, 16), overlap=4, divisible_by=8)
    return folder
