"""UIDs the node creates: new ones under the configured root, and recognising its own."""

from __future__ import annotations

import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from . import __version__

#: The project's own OID arc: a UUID-derived OID (ISO/IEC 9834-8, PS3.5 B.2), UUID
#: 8c62fdb5-fc54-4572-ac83-0ae2d8da51ed, drawn once for this project. Never change it.
PROJECT_UID_ROOT = "2.25.186605910370043874471064860109160731117"
#: Implementation Class UID (PS3.7 D.3.3.2) the node sends in every A-ASSOCIATE-RQ and -AC, as SCP and SCU:
#: the project's arc, .1 (implementation), .1 (the first implementation class). A new one only when the
#: network behaviour changes incompatibly; the version name tells releases apart.
IMPLEMENTATION_CLASS_UID = f"{PROJECT_UID_ROOT}.1.1"
#: Implementation Version Name (1-16 characters): the package version.
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

#: A UID's form (PS3.5 9.1): numeric components separated by dots, none empty, at most 64 characters.
#: Leading zeros in a component are not allowed by the standard but harmless and seen in the wild
#: (older devices), so they are accepted; anything else (letters, '/', '+', '..', spaces) is not.
_UID_FORM = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """True if ``value`` has the form of a DICOM UID: digits and dots, no empty component, ≤ 64 chars."""
    return len(value) <= MAX_UID_LENGTH and _UID_FORM.fullmatch(value) is not None


def _root(prefix: str) -> str:
    return prefix if prefix.endswith(".") else prefix + "."


def new_uid(prefix: str | None) -> str:
    """A new UID under ``prefix`` (a trailing '.' is added if missing); None: pydicom's root."""
    return str(generate_uid(prefix=PYDICOM_ROOT_UID if prefix is None else _root(prefix)))


def is_own_uid(uid: str, prefix: str | None) -> bool:
    """True if ``uid`` lies under the node's root ``prefix``.

    With no root configured (None) nothing can be told apart: pydicom's root is shared by every pydicom
    user, so the answer is False.
    """
    if not prefix:
        return False
    return str(uid).startswith(_root(prefix))
