"""Real DICOM peers for end-to-end tests: dcmtk storescu/echoscu/storescp, Orthanc, dciodvfy.

The dcmtk tools are called by absolute path: ``storescu`` on PATH may be pynetdicom's Python app.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
#: Orthanc's DICOMweb plugin (Debian's orthanc-dicomweb): STOW-RS, QIDO-RS and WADO-RS under /dicom-web/.
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DCIODVFY = Path("/usr/bin/dciodvfy")
REQUIRED_TOOLS: tuple[Path, ...] = (STORESCU, ECHOSCU, STORESCP, ORTHANC, ORTHANC_DICOMWEB, DCIODVFY)

LOCALHOST = "127.0.0.1"

# dcmtk and Orthanc disable Nagle's algorithm when TCP_NODELAY is set; without it a loopback
# C-STORE waits on delayed ACKs and runs about 75 times slower.
DCMTK_ENV: dict[str, str] = {**os.environ, "TCP_NODELAY": "1"}

# Transfer syntaxes every storage context proposes; anything else gets a context of its own.
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# dcmtk's association configuration allows at most 128 presentation contexts per profile.
_MAX_PRESENTATION_CONTEXTS = 128
_STORESCU_PROFILE = "E2E"


def missing_tools() -> list[Path]:
    """The required peer executables (and Orthanc's DICOMweb plugin) that are not installed."""
    return [tool for tool in REQUIRED_TOOLS
            if not (tool.is_file() and (tool.suffix == ".so" or os.access(tool, os.X_OK)))]


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the CI variable says so (GitHub, GitLab and most CI services set CI=true)."""
    return environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def tools_verdict(missing: Sequence[Path], environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """("skip" | "fail", reason) when tools are missing: skip locally, fail in CI; None when all are there."""
    if not missing:
        return None
    reason = "end-to-end peers not installed: " + ", ".join(map(str, missing)) + " (run .ci/install-test-deps.sh)"
    if in_ci(environ):
        return "fail", reason + "; CI is set, so a missing peer is an error"
    return "skip", reason


def require_tools() -> None:
    """In a test: skip (locally) or fail (CI) when a peer executable is missing."""
    import pytest

    verdict = tools_verdict(missing_tools())
    if verdict is not None:
        action, reason = verdict
        if action == "fail":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def free_port(*, besides: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, other than those in ``besides`` (the kernel may hand
    out a port again as soon as its probe socket is closed: a node's DICOM and HTTP ports drawn one after the
    other were once the same)."""
    taken = set(besides)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _as_paths(files_or_dir: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(files_or_dir, (str, os.PathLike)):
        return [Path(files_or_dir)]
    return [Path(item) for item in files_or_dir]


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Files, with directories replaced by the files under them (recursively)."""
    files: list[Path] = []
    for item in paths:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        else:
            files.append(item)
    return files


def _sop_class_and_syntax(path: Path) -> tuple[str, str] | None:
    """(SOP Class UID, Transfer Syntax UID) of a DICOM file; None for anything else."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    meta = ds.get("file_meta")
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop_class = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID")
    if not syntax or not sop_class:
        return None
    return str(sop_class), str(syntax)


def storescu_profile(files: Sequence[Path]) -> str:
    """A storescu association profile proposing exactly what ``files`` need.

    Each SOP class gets one context with the uncompressed syntaxes and one context per other
    transfer syntax found among its files, so compressed files are sent as they are.
    """
    pairs = sorted({pair for path in files if (pair := _sop_class_and_syntax(path)) is not None})
    if not pairs:
        raise ValueError(f"no DICOM files with file meta information among {len(files)} path(s)")
    syntax_names = {ExplicitVRLittleEndian: "Uncompressed", ImplicitVRLittleEndian: "Uncompressed"}
    syntax_lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    syntax_lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(_UNCOMPRESSED, start=1)]
    contexts: list[tuple[str, str]] = []
    for sop_class, syntax in pairs:
        if syntax not in syntax_names:
            name = f"TS{len(syntax_names)}"
            syntax_names[syntax] = name
            syntax_lines += [f"[{name}]", f"TransferSyntax1 = {syntax}"]
        if (sop_class, "Uncompressed") not in contexts:
            contexts.append((sop_class, "Uncompressed"))
        if (sop_class, syntax_names[syntax]) not in contexts:
            contexts.append((sop_class, syntax_names[syntax]))
    if len(contexts) > _MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, dcmtk allows {_MAX_PRESENTATION_CONTEXTS}")
    context_lines = ["[[PresentationContexts]]", "[Contexts]"]
    context_lines += [f"PresentationContext{i} = {sop}\\{ts}" for i, (sop, ts) in enumerate(contexts, start=1)]
    profile_lines = ["[[Profiles]]", f"[{_STORESCU_PROFILE}]", "PresentationContexts = Contexts"]
    return "\n".join(syntax_lines + context_lines + profile_lines) + "\n"


def storescu(
    port: int,
    files_or_dir: Path | str | Iterable[Path | str],
    *,
    called_ae: str,
    calling_ae: str = "SCANNER",
    timeout: float = 120,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files and/or directories (recursively) to 127.0.0.1:port in one association.

    Proposes each file's own transfer syntax (compressed ones included) plus the uncompressed
    ones, for the SOP classes present only. ``-nh``: files that fail do not stop the rest, and
    storescu then exits 0 even though stores failed: check ``failed_stores(result)`` too.
    """
    paths = _as_paths(files_or_dir)
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        config = Path(tmp) / "storescu.cfg"
        config.write_text(storescu_profile(_expand(paths)))
        args = [str(STORESCU), "-aet", calling_ae, "-aec", called_ae, "-nh"]
        args += ["-xf", str(config), _STORESCU_PROFILE]
        if any(p.is_dir() for p in paths):
            args += ["+sd", "+r"]
        args += [*extra_args, LOCALHOST, str(port), *map(str, paths)]
        return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False)


_STORE_FAILURE = re.compile(
    r"^[EF]: (Store Failed|Store SCU Failed|No presentation context|No Acceptable Presentation)", re.I
)


def failed_stores(result: subprocess.CompletedProcess[str]) -> list[str]:
    """storescu's error lines about stores that failed (not about unreadable non-DICOM inputs)."""
    lines = (result.stderr + result.stdout).splitlines()
    return [line for line in lines if _STORE_FAILURE.match(line)]


def echoscu(
    port: int, *, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 30, extra_args: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """C-ECHO 127.0.0.1:port with dcmtk echoscu (``extra_args``: e.g. its TLS options)."""
    args = [str(ECHOSCU), "-aet", calling_ae, "-aec", called_ae, *extra_args, LOCALHOST, str(port)]
    return subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False)


def dciodvfy(path: Path | str) -> list[str]:
    """The "Error" lines dciodvfy reports for one file (its exit status is not reliable)."""
    result = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False
    )
    lines = (result.stderr + result.stdout).splitlines()
    return [line.strip() for line in lines if line.lstrip().startswith("Error")]


def assert_valid_dicom(paths: Iterable[Path | str]) -> None:
    """Fail with every file's dciodvfy errors, if any file has one."""
    checked = 0
    failures: list[str] = []
    for path in paths:
        checked += 1
        errors = dciodvfy(path)
        if errors:
            failures.append(f"{path}:\n  " + "\n  ".join(errors))
    assert checked, "assert_valid_dicom: no files given"
    assert not failures, f"dciodvfy errors in {len(failures)} of {checked} file(s):\n" + "\n".join(failures)


def _terminate(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Loopback only: ignore any http_proxy of the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

SeriesMatch = str | Callable[[dict[str, Any]], bool]


class Orthanc:
    """A throw-away Orthanc on free loopback ports, configured from parameters.

    ``modalities``: name -> (AET, host, port), the peers Orthanc may C-STORE/C-MOVE to.
    Starts in about 0.1 s. A graceful stop (SIGTERM) takes about 3 s, so by default ``stop()``
    kills the process: its storage is thrown away anyway.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        workdir: Path | None = None,
        stable_age: int = 1,
        verbose: bool = False,
        startup_timeout: float = 30.0,
        graceful_stop: bool = False,
        dicomweb: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.aet = aet
        self.dicomweb = dicomweb
        #: HTTP basic authentication (user -> password) on the REST API and DICOMweb; the tests' own requests
        #: use the first user.
        self.users = dict(users or {})
        self.modalities = {name: list(entry) for name, entry in (modalities or {}).items()}
        self.stable_age = stable_age
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.graceful_stop = graceful_stop
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://{LOCALHOST}:{self.http_port}"
        #: The DICOMweb root (with ``dicomweb=True``).
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this instance runs with."""
        storage = self.workdir / "storage"
        return {
            "Name": f"e2e-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [str(ORTHANC_DICOMWEB)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # Orthanc 1.10 binds all interfaces; this limits it to localhost
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomAssociationCloseDelay": 0,  # release SCU associations at once (the receiver sees the end)
            "DicomScuTimeout": 10,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "SyncStorageArea": False,
            "DeidentifyLogs": False,
        }

    def start(self) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        if self._process is not None:
            raise RuntimeError("Orthanc already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log = self.log_path.open("ab")
        args = [str(ORTHANC), *(["--verbose"] if self.verbose else []), str(self.config_path)]
        self._process = subprocess.Popen(
            args, cwd=self.workdir, env=DCMTK_ENV, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RuntimeError(f"Orthanc exited with {code} at start; log:\n{_tail(self.log_path)}")
            try:
                self.system()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                waited = f"{self.startup_timeout:.0f} s"
                raise RuntimeError(f"Orthanc REST API {self.url} not up after {waited}; log:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop Orthanc (kill, or terminate then kill) and remove its temporary folder if it made one."""
        if self._process is not None:
            if self.graceful_stop:
                _terminate(self._process)
            else:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # REST

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> bytes:
        data = None
        headers: dict[str, str] = {}
        if self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
            headers["Content-Type"] = "application/dicom"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with _HTTP.open(request, timeout=timeout) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        """GET a REST path, JSON-decoded."""
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: Any = None, timeout: float = 60) -> Any:
        """POST to a REST path (JSON body, or bytes as application/dicom), JSON-decoded."""
        raw = self._request("POST", path, body, timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def system(self) -> dict[str, Any]:
        return dict(self._get_quick("/system"))

    def _get_quick(self, path: str) -> Any:
        return json.loads(self._request("GET", path, timeout=2))

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get("/studies"))

    def all_series(self) -> list[dict[str, Any]]:
        """Every series, with MainDicomTags and Instances."""
        return list(self.get("/series?expand"))

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/series"))

    def series_info(self, series_id: str) -> dict[str, Any]:
        """One series: MainDicomTags (SeriesDescription, Modality, ...), Instances, ParentStudy."""
        return dict(self.get(f"/series/{series_id}"))

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Keyword -> value of one instance (sequences as lists of dicts)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def upload(self, dicom_file: Path | bytes) -> dict[str, Any]:
        """Store one file through REST (no DICOM network involved)."""
        data = dicom_file if isinstance(dicom_file, bytes) else Path(dicom_file).read_bytes()
        return dict(self.post("/instances", data))

    def find_series(self, description_regex: str) -> list[dict[str, Any]]:
        """Series whose SeriesDescription matches the regex (re.search)."""
        pattern = re.compile(description_regex)
        return [s for s in self.all_series() if pattern.search(s["MainDicomTags"].get("SeriesDescription", ""))]

    def wait_for_series(
        self, match: SeriesMatch, *, count: int | None = None, timeout: float = 120, poll: float = 0.2
    ) -> list[dict[str, Any]]:
        """Wait until a series matches and, if ``count`` is given, every match holds ``count`` instances.

        ``match``: a SeriesDescription regex or a predicate on the series dict. Returns the matches.
        """
        predicate: Callable[[dict[str, Any]], bool]
        if isinstance(match, str):
            pattern = re.compile(match)
            predicate = lambda s: bool(pattern.search(s["MainDicomTags"].get("SeriesDescription", "")))  # noqa: E731
        else:
            predicate = match
        deadline = time.monotonic() + timeout
        while True:
            series = self.all_series()
            found = [s for s in series if predicate(s)]
            if found and (count is None or all(len(s["Instances"]) == count for s in found)):
                return found
            if time.monotonic() > deadline:
                have = [
                    f"{s['MainDicomTags'].get('SeriesDescription', '')!r} ({len(s['Instances'])} instances)"
                    for s in series
                ]
                wanted = f"{match!r}" + (f" with {count} instances" if count is not None else "")
                raise TimeoutError(f"no series {wanted} in Orthanc after {timeout:.0f} s; it has: {have or 'nothing'}")
            time.sleep(poll)

    def add_modality(self, name: str, aet: str, port: int, host: str = LOCALHOST) -> None:
        """Register (or replace) a DICOM peer at run time."""
        self._request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = [aet, host, port]

    def echo_modality(self, name: str) -> bool:
        """C-ECHO from Orthanc to a registered modality."""
        try:
            self._request("POST", f"/modalities/{name}/echo", {})
        except urllib.error.HTTPError:
            return False
        return True

    def store_to_modality(self, name: str, resource_ids: Sequence[str], timeout: float = 120) -> dict[str, Any]:
        """C-STORE studies/series/instances (Orthanc IDs) to a registered modality, synchronously."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        return dict(self.post(f"/modalities/{name}/store", body, timeout=timeout))


class StoreSCP:
    """dcmtk storescp on a free loopback port, writing every received object into ``directory``.

    The port is chosen at construction, so a peer can be told about it before ``start()``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        echo_args: Sequence[str] = (),
    ) -> None:
        self.echo_args = tuple(echo_args)  # echoscu options to reach it (e.g. TLS) while waiting for it
        self.directory = Path(directory)
        self.aet = aet
        self.port = port if port is not None else free_port()
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.directory.parent / f"storescp-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> StoreSCP:
        """Start storescp and wait until it answers C-ECHO."""
        if self.running:
            raise RuntimeError("storescp already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        args = [str(STORESCP), "-aet", self.aet, "-od", str(self.directory), "+xa", "-dhl", "-fe", ".dcm"]
        args += [*self.extra_args, str(self.port)]
        self._process = subprocess.Popen(args, env=DCMTK_ENV, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RuntimeError(f"storescp exited with {code} at start; log:\n{_tail(self.log_path)}")
            if echoscu(self.port, called_ae=self.aet, timeout=5, extra_args=self.echo_args).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"storescp not answering on {self.port}; log:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def files(self) -> list[Path]:
        """Received files (storescp names them <modality>.<SOPInstanceUID>.dcm)."""
        return sorted(p for p in self.directory.glob("*.dcm") if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 60, poll: float = 0.1) -> list[Path]:
        """Wait until at least ``count`` files have been received and none is still growing."""
        deadline = time.monotonic() + timeout
        sizes: dict[Path, int] = {}
        while True:
            found = self.files()
            previous, sizes = sizes, {p: p.stat().st_size for p in found}
            if len(found) >= count and sizes == previous:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"storescp received {len(found)} of {count} files in {timeout:.0f} s; log:\n{_tail(self.log_path)}"
                )
            time.sleep(poll)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)
