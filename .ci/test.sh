#!/usr/bin/env bash
# Install what the tests need (dcmtk, Orthanc, dicom3tools from Debian; the package with its test
# extra) and run the test suite. Heavy suites (marker "heavy") are left out; run them with
#   python3 -m pytest -m heavy
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-test-deps.sh
exec python3 -m pytest -q -ra --durations=15 "$@"
