"""DICOMweb STOW-RS: the second way out, for PACS and VNAs that prefer HTTP to DIMSE.

:func:`store` POSTs stored objects, unchanged, as one ``multipart/related; type="application/dicom"`` request
to ``{url}/studies`` with dicomweb-client, and reads the Store Instances Response (PS3.18 10.5.3): an object
listed in its Referenced SOP Sequence was stored; one in its Failed SOP Sequence was not, with its Failure
Reason. A response with no body (some servers answer 200 without one) means all were stored; an HTTP
error that carries no Store Instances Response, or no connection, means none was. The node's outbox does the retrying:
dicomweb-client's own retries are off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from .config import Destination, TLSSettings

log = logging.getLogger(__name__)

#: Failure Reason (0008,1197) values of PS3.18 Table 10.5.3-2 and PS3.4 (C-STORE statuses), as words.
_REASONS = {
    0x0110: "processing failure", 0x0112: "no such object instance", 0x0122: "SOP class not supported",
    0x0124: "not authorized", 0xA700: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
    0xB000: "coercion of data elements", 0xB006: "elements discarded", 0xB007: "data set does not match SOP class",
}


@dataclass
class StowResult:
    """What one STOW-RS request did: SOP Instance UIDs stored, and those refused with the reason."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    #: The request as a whole failed (no connection, an HTTP error without a response body): none stored.
    error: str | None = None


def _session(dest: Destination, tls: TLSSettings) -> requests.Session:
    session = requests.Session()
    session.verify = str(dest.tls_ca_file) if dest.tls_ca_file else True
    if dest.tls_client_cert and tls.cert_file is not None:
        session.cert = (str(tls.cert_file), str(tls.key_file)) if tls.key_file else str(tls.cert_file)
    if dest.username is not None and dest.password_file is not None:
        session.auth = (dest.username, Path(dest.password_file).read_text(encoding="utf-8").strip())
    if dest.token_file is not None:
        token = Path(dest.token_file).read_text(encoding="utf-8").strip()
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def client(dest: Destination, tls: TLSSettings, timeout_s: float) -> DICOMwebClient:
    """A dicomweb-client for ``dest`` (its TLS, authentication and timeout), without retries of its own."""
    web = DICOMwebClient(str(dest.url), session=_session(dest, tls), timeout=timeout_s)
    web.set_http_retry_params(retry=False)
    return web


def _reason(item: Dataset) -> str:
    code = item.get("FailureReason")
    if code is None:
        return "refused (no failure reason given)"
    return f"FailureReason 0x{int(code):04X} ({_REASONS.get(int(code), 'unknown reason')})"


def read_response(response: Dataset, sent: list[str]) -> StowResult:
    """The outcome per object of a Store Instances Response to a request that carried ``sent``."""
    result = StowResult()
    if "ReferencedSOPSequence" not in response and "FailedSOPSequence" not in response:
        result.stored = set(sent)  # a success without a body
        return result
    for item in response.get("ReferencedSOPSequence", []):
        result.stored.add(str(item.ReferencedSOPInstanceUID))
    for item in response.get("FailedSOPSequence", []):
        result.failed[str(item.ReferencedSOPInstanceUID)] = _reason(item)
    for uid in sent:
        if uid not in result.stored and uid not in result.failed:
            result.failed[uid] = "not listed in the STOW-RS response"
    return result


def _error_response(exc: requests.HTTPError) -> Dataset | None:
    """The Store Instances Response an HTTP error carries (409 Conflict, 400), when it carries one."""
    response = exc.response
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0] not in ("application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def store(web: DICOMwebClient, datasets: list[Dataset]) -> StowResult:
    """POST ``datasets`` (as read from their files, transfer syntax kept) in one STOW-RS request."""
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        response = web.store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        body = _error_response(exc)
        if body is not None and "FailedSOPSequence" in body:
            result = read_response(body, sent)
            for uid in sent:
                if uid in result.stored:
                    continue
                result.failed.setdefault(uid, f"HTTP {status}")
            return result
        return StowResult(error=f"HTTP {status} {exc.response.reason if exc.response is not None else ''}".strip())
    except requests.RequestException as exc:
        return StowResult(error=f"no connection: {type(exc).__name__}")
    return read_response(response, sent)


def echo(dest: Destination, tls: TLSSettings, timeout_s: float) -> tuple[bool, str]:
    """Ask the DICOMweb service for one study (QIDO-RS): proves the URL, TLS and authentication; (ok, message)."""
    try:
        web = client(dest, tls, timeout_s)
        web.search_for_studies(limit=1)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        return False, f"STOW-RS {dest.url}: HTTP {status} on a QIDO-RS search"
    except (requests.RequestException, OSError) as exc:
        return False, f"STOW-RS {dest.url}: no connection ({type(exc).__name__})"
    return True, f"STOW-RS {dest.url}: the DICOMweb service answers"
