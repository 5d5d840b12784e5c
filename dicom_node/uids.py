"""UIDs the node creates: new ones under the configured root, and recognising its own."""

from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid


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
