#!/usr/bin/env bash
# Build a wheelhouse for an offline installation: the node (with its bundled models) and every dependency as
# wheels, in one folder. Run it on a machine with the same OS, CPU architecture and Python version as the
# target (Debian 12, x86_64, Python 3.11) and access to PyPI:
#
#     bash deploy/wheelhouse.sh [WHEELHOUSE]          (default: ./wheelhouse)
#
# Copy the folder to the target, then install without any network access:
#
#     python3 -m venv /opt/dicom-node
#     /opt/dicom-node/bin/pip install --no-index --find-links WHEELHOUSE dicom-node
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELHOUSE="$(realpath -m "${1:-wheelhouse}")"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WHEELHOUSE"
# the scale extra too (psycopg, celery[redis]: a PostgreSQL journal, Celery workers), for deploy/compose-scaleout.yaml
"$PYTHON" -m pip wheel --wheel-dir "$WHEELHOUSE" "$REPO_ROOT[scale]"
# what building the node from its source needs (pyproject's build-system), so that an offline
# `pip install --no-index --find-links WHEELHOUSE /path/to/source` (deploy/Containerfile) works too
"$PYTHON" -m pip download --dest "$WHEELHOUSE" --only-binary :all: "setuptools>=68" wheel
# redis (the scale extra) needs async-timeout on Python before 3.11.3, such as Debian 12's 3.11.2, which a
# wheelhouse made with a newer Python would leave out
"$PYTHON" -m pip download --dest "$WHEELHOUSE" --only-binary :all: "async-timeout>=4.0.3"
echo "wheelhouse: $WHEELHOUSE ($(ls "$WHEELHOUSE" | wc -l) wheels); install offline with:"
echo "  python3 -m venv /opt/dicom-node && /opt/dicom-node/bin/pip install --no-index --find-links $WHEELHOUSE dicom-node"
