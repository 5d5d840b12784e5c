from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, UID

from dicom_node.uids import is_own_uid, is_valid_uid, new_uid


def test_new_uid_lies_under_the_prefix_and_is_valid() -> None:
    uid = new_uid("1.2.826.0.1.3680043.10.999")
    assert uid.startswith("1.2.826.0.1.3680043.10.999.")
    assert UID(uid).is_valid
    assert uid == uid.strip() and len(uid) <= 64


def test_new_uid_accepts_a_prefix_with_trailing_dot() -> None:
    assert new_uid("1.2.3.").startswith("1.2.3.")
    assert ".." not in new_uid("1.2.3.")


def test_new_uid_without_prefix_uses_pydicom_root() -> None:
    uid = new_uid(None)
    assert uid.startswith(PYDICOM_ROOT_UID) and UID(uid).is_valid


def test_new_uids_are_unique() -> None:
    assert len({new_uid("1.2.3") for _ in range(500)}) == 500


def test_is_own_uid() -> None:
    assert is_own_uid(new_uid("1.2.3"), "1.2.3")
    assert is_own_uid(new_uid("1.2.3"), "1.2.3.")
    assert not is_own_uid("1.2.34.5", "1.2.3")      # a longer component is not under the root
    assert not is_own_uid("1.2.4.5", "1.2.3")
    assert not is_own_uid(new_uid(None), None)     # pydicom's root is everyone's


def test_is_valid_uid() -> None:
    from dicom_node.uids import is_valid_uid

    for good in ("1.2.3", "0", "1.2.840.10008.5.1.4.1.1.4", "1" * 64, "1.2.840.01"):  # leading zero: lenient
        assert is_valid_uid(good), good
    for bad in ("", "..", ".", "1..2", "1.2.", ".1", "1+1", "1_1", "a/b", "1.2.3 ", "1.2.3\x00", "１.２",
                "1" * 65, "1.2.a"):
        assert not is_valid_uid(bad), bad


def test_the_implementation_identity_is_the_projects_own() -> None:
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

    from dicom_node import __version__
    from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, PROJECT_UID_ROOT

    assert is_valid_uid(IMPLEMENTATION_CLASS_UID) and IMPLEMENTATION_CLASS_UID.startswith(PROJECT_UID_ROOT + ".")
    assert IMPLEMENTATION_CLASS_UID not in (PYDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_UID)
    assert 1 <= len(IMPLEMENTATION_VERSION_NAME) <= 16 and __version__ in IMPLEMENTATION_VERSION_NAME
