"""DICOMweb STOW-RS: the second way out, for PACS and VNAs that prefer HTTP to DIMSE.

:func:`store` POSTs stored objects, unchanged, as one ``multipart/related; type="application/dicom"`` request
to ``{url}/studies`` with dicomweb-client, and reads the Store Instances Response (PS3.18 10.5.3): an object
listed in its Referenced SOP Sequence was stored; one in its Failed SOP Sequence was not, with its Failure
Reason. A 2xx answer with no body at all (some servers answer 200 without one) means all were stored; any other
2xx body that is not a Store Instances Response (an auth gateway's HTML login page, a JSON list from the QIDO-RS
endpoint a redirect turned the POST into), an HTTP error that carries no Store Instances Response, or no
connection, means none was. The node's outbox does the retrying: dicomweb-client's own retries are off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

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
#: The media types a Store Instances Response comes in (PS3.18 10.5.3), JSON and XML.
_JSON = ("application/dicom+json", "application/json")
_XML = ("application/dicom+xml", "application/xml")
#: What dicomweb-client raises reading a 2xx body that is not what its Content-Type says (a JSON list, no
#: Content-Type, broken JSON or XML; requests' JSONDecodeError is a ValueError, XML's ParseError a SyntaxError).
_UNREADABLE = (ValueError, KeyError, AttributeError, TypeError, SyntaxError)


@dataclass
class StowResult:
    """What one STOW-RS request did: SOP Instance UIDs stored, and those refused with the reason."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    #: The request as a whole failed (no connection, an HTTP error without a response body): none stored.
    error: str | None = None
    #: False when no connection could be made (the destination, not the objects: the dispatcher does not try it
    #: again in the same round)
    connected: bool = True


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


class StowClient:
    """A dicomweb-client for one destination, and the HTTP answer to its last request (kept by a response hook).

    dicomweb-client reads a 2xx answer whose body it does not know as an empty Dataset, the same as no body at
    all; whether anything was stored is therefore judged from the answer itself (:func:`_settle`)."""

    def __init__(self, web: DICOMwebClient) -> None:
        self.web = web
        self.answer: requests.Response | None = None

    def keep(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        """requests' response hook: called for each response, a redirect's last one included."""
        self.answer = response
        return response


def client(dest: Destination, tls: TLSSettings, timeout_s: float) -> StowClient:
    """A dicomweb-client for ``dest`` (its TLS, authentication and timeout), without retries of its own."""
    session = _session(dest, tls)
    web = DICOMwebClient(str(dest.url), session=session, timeout=timeout_s)
    web.set_http_retry_params(retry=False)
    stow = StowClient(web)
    session.hooks["response"].append(stow.keep)
    return stow


def _reason(item: Dataset) -> str:
    code = item.get("FailureReason")
    if code is None:
        return "refused (no failure reason given)"
    return f"FailureReason 0x{int(code):04X} ({_REASONS.get(int(code), 'unknown reason')})"


def read_response(response: Dataset | None, sent: list[str]) -> StowResult:
    """The outcome per object of a Store Instances Response to a request that carried ``sent``; None: a success
    without a body, all stored. An object the response does not list was not stored (an empty data set lists none:
    it is what dicomweb-client makes of a body it cannot read)."""
    result = StowResult()
    if response is None:
        result.stored = set(sent)
        return result
    for item in response.get("ReferencedSOPSequence", []):
        result.stored.add(str(item.ReferencedSOPInstanceUID))
    for item in response.get("FailedSOPSequence", []):
        result.failed[str(item.ReferencedSOPInstanceUID)] = _reason(item)
    for uid in sent:
        if uid not in result.stored and uid not in result.failed:
            result.failed[uid] = "not listed in the STOW-RS response"
    return result


def _media_type(answer: requests.Response) -> str:
    return answer.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _json_dataset(answer: requests.Response) -> Dataset | None:
    """The data set of a DICOM JSON body; None when the body is not one (not JSON, or not a JSON object)."""
    try:
        body = answer.json()
        return Dataset.from_json(body) if isinstance(body, dict) else None
    except _UNREADABLE:
        return None


def _error_response(exc: requests.HTTPError) -> Dataset | None:
    """The Store Instances Response an HTTP error carries (409 Conflict, 400), when it carries one."""
    response = exc.response
    if response is None or not response.content or _media_type(response) not in _JSON:
        return None
    return _json_dataset(response)


def _not_stored(answer: requests.Response) -> str | None:
    """Why a 2xx answer says nothing was stored, or None when it may be a Store Instances Response (or none)."""
    if not 200 <= answer.status_code < 300:  # a 3xx that was not followed (no Location), say
        return f"HTTP {answer.status_code}: not a success"
    method = answer.request.method if answer.request is not None else "POST"
    if method != "POST":  # a 301/302 makes requests repeat the POST as a GET: its answer is no store's
        return (f"the POST was redirected to {answer.url} and answered as a {method} (HTTP {answer.status_code}): "
                "not a Store Instances Response")
    if answer.content and _media_type(answer) not in _JSON + _XML:
        return (f"HTTP {answer.status_code} with Content-Type {answer.headers.get('Content-Type') or '(none)'}: "
                "not a Store Instances Response")
    return None


def _xml_dataset(answer: requests.Response) -> Dataset | None:
    """The data set of a DICOM XML (Native DICOM Model) body; None when the body is not one."""
    from dicomweb_client.web import _load_xml_dataset  # the library's own reader of that model

    try:
        return _load_xml_dataset(ElementTree.fromstring(answer.content))
    except _UNREADABLE:
        return None


def _settle(answer: requests.Response | None, sent: list[str]) -> StowResult:
    """The outcome of a 2xx answer, judged from the answer itself (dicomweb-client reads a body it does not know as
    an empty data set): all stored when it has no body at all; per object when its body is a Store Instances
    Response; else none stored, with the reason (the outbox tries them again)."""
    if answer is None:  # (the hook keeps every answer; without one nothing can be told)
        return StowResult(error="no HTTP answer to judge: nothing taken as stored")
    problem = _not_stored(answer)
    if problem is not None:
        return StowResult(error=problem)
    if not answer.content:
        return read_response(None, sent)
    # read here, not by dicomweb-client, which knows only the bare media types (not "; charset=utf-8")
    response = _json_dataset(answer) if _media_type(answer) in _JSON else _xml_dataset(answer)
    if response is None:
        return StowResult(error=f"HTTP {answer.status_code}: unreadable Store Instances Response "
                                f"({answer.headers.get('Content-Type')})")
    return read_response(response, sent)


def _refused(exc: requests.HTTPError, sent: list[str]) -> StowResult:
    """The outcome of an HTTP error: per object when it carries a Store Instances Response, else none stored."""
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


def connection_reason(exc: BaseException, limit: int = 300) -> str:
    """Why a request found no service, in words an engineer can act on (the TLS verification failure, the name
    that does not resolve, the refused port), cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def store(stow: StowClient, datasets: list[Dataset]) -> StowResult:
    """POST ``datasets`` (as read from their files, transfer syntax kept) in one STOW-RS request."""
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    stow.answer = None  # this request's answer only
    try:
        stow.web.store_instances(datasets)  # what it makes of the answer is not used: _settle reads the answer
    except requests.HTTPError as exc:
        return _refused(exc, sent)
    except requests.JSONDecodeError:
        pass  # dicomweb-client read as JSON a body that is not: judged from the answer below
    except requests.RequestException as exc:
        return StowResult(error=f"no connection: {connection_reason(exc)}", connected=False)
    except _UNREADABLE:  # dicomweb-client could not read a 2xx body (a JSON list, no Content-Type): judged below
        if stow.answer is None or not stow.answer.ok:
            raise  # not the reading of an answer: an unexpected fault, the dispatcher's to report
    return _settle(stow.answer, sent)


def echo(dest: Destination, tls: TLSSettings, timeout_s: float) -> tuple[bool, str]:
    """Ask the DICOMweb service for one study (QIDO-RS): proves the URL, TLS and authentication; (ok, message)."""
    try:
        client(dest, tls, timeout_s).web.search_for_studies(limit=1)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        return False, f"STOW-RS {dest.url}: HTTP {status} on a QIDO-RS search"
    except requests.RequestException as exc:
        return False, f"STOW-RS {dest.url}: no connection ({connection_reason(exc)})"
    except (OSError, UnicodeDecodeError) as exc:  # a password or token file that cannot be read
        return False, f"STOW-RS {dest.url}: cannot set up: {exc}"
    return True, f"STOW-RS {dest.url}: the DICOMweb service answers"
