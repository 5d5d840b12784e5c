"""Run the node's CLI as another user: ``python -m tests.e2e.as_user USER -- serve --config FILE``.

Started as root, it imports what the node runs (its own packages, pydicom, pynetdicom, apscheduler, the
text codecs, the native libraries), then drops to USER for good (supplementary groups cleared; real,
effective and saved group and user ids set to USER's) and calls ``dicom_node.cli.main``. From then on
the process can open only what USER may, and everything it creates belongs to USER.

Why not ``setpriv --reuid=USER python ...``: where the interpreter and its packages live somewhere USER
cannot read (here Python is installed under /root, 0700), the interpreter cannot even start as USER; a
production install puts the code where the node's user can read it (README, Set-up). Only imports that
happen after the drop still need readable files: a module the preload missed fails with a permission
error, which the test reading the log would see.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import pwd
import sys

#: Packages imported whole (every submodule), and prefixes left out (training needs torch; apps, tests)
PRELOAD_WHOLE = ("dicom_node", "inference", "pydicom", "pynetdicom", "apscheduler", "encodings")
PRELOAD_SKIP = ("inference.training", "pynetdicom.apps", "pynetdicom.tests", "pydicom.tests", "pydicom.benchmarks",
                "encodings.mbcs", "encodings.oem", "encodings.cp65001")
#: Modules imported as they are (large packages: the node's own imports pull in what it uses of them, but
#: numpy loads some subpackages on first use, e.g. numpy.ma from np.median)
PRELOAD_TOP = ("numpy", "numpy.ma", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial", "SimpleITK",
               "highdicom", "PIL.Image", "onnxruntime", "pydantic", "sqlite3", "zlib", "json", "logging.handlers",
               "concurrent.futures", "socketserver", "tomllib", "uuid", "hashlib")


def preload() -> list[str]:
    """Import everything the node may import later; the names that failed (optional extras)."""
    failed = []
    for name in PRELOAD_TOP:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional library missing here is not this launcher's business
            failed.append(name)
    for name in PRELOAD_WHOLE:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=lambda _name: None):
            if info.name.startswith(PRELOAD_SKIP):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - optional backends (other databases, other platforms)
                failed.append(info.name)
    return failed


def drop_to(user: str) -> None:
    """Become ``user`` for good: no supplementary groups, its group, its user id (real, effective, saved)."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise SystemExit(f"could not become {user}")
    try:
        os.setuid(0)
    except PermissionError:
        pass  # as it must be: no way back
    else:
        raise SystemExit(f"could become root again after dropping to {user}")
    os.environ.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: python -m tests.e2e.as_user USER -- dicom-node arguments")
    if os.geteuid() != 0:
        raise SystemExit("must start as root (it drops to USER)")
    user, args = argv[0], argv[2:]
    preload()
    from dicom_node.cli import main as node_main

    drop_to(user)
    return int(node_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
