#!/usr/bin/env bash
# Install what the test suite needs on Debian 12 (run as root): the end-to-end peers
# (dcmtk, Orthanc with its DICOMweb plugin, dicom3tools; openssl makes the TLS tests' certificates; chromium shows
# the dashboard headless; PostgreSQL and Redis for the scale-out tests: shared journal and Celery broker; logrotate
# checks deploy/dicom-node.logrotate) and the project with its test extra.
# Safe to run again.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PEERS=(/usr/bin/storescu /usr/bin/echoscu /usr/bin/storescp /usr/sbin/Orthanc /usr/bin/dciodvfy /usr/bin/openssl
       /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/chromium /usr/lib/postgresql/15/bin/postgres
       /usr/bin/redis-server /usr/sbin/logrotate)

missing=()
for tool in "${PEERS[@]}"; do
    [[ -e "$tool" ]] || missing+=("$tool")
done
pip_missing=0
"$PYTHON" -m pip --version >/dev/null 2>&1 || pip_missing=1
# tests/test_packaging.py makes virtual environments with pip (Debian: python3-venv provides ensurepip)
venv_missing=0
"$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 || venv_missing=1

if (( ${#missing[@]} > 0 || pip_missing || venv_missing )); then
    packages=(dcmtk orthanc orthanc-dicomweb dicom3tools openssl chromium postgresql redis-server logrotate)
    (( pip_missing )) && packages+=(python3-pip)
    (( venv_missing )) && packages+=(python3-venv)
    echo "installing ${packages[*]} (missing: ${missing[*]:-} $( (( pip_missing )) && echo "pip" ) $( (( venv_missing )) && echo "venv" ))"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
else
    echo "dcmtk, Orthanc, dicom3tools, openssl and chromium already installed"
fi

# The orthanc, postgresql and redis-server packages start system services (4242/8042, 5432, 6379); the tests run
# their own, each on a free port of 127.0.0.1.
for service in orthanc postgresql redis-server; do
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl stop "$service.service" 2>/dev/null || true
        systemctl disable "$service.service" 2>/dev/null || true
    elif [[ -x "/etc/init.d/$service" ]]; then
        service "$service" stop >/dev/null 2>&1 || true
    fi
done
if pgrep -x Orthanc >/dev/null 2>&1; then
    echo "warning: an Orthanc process is still running:" >&2
    pgrep -a -x Orthanc >&2 || true
fi

for tool in "${PEERS[@]}"; do
    [[ -e "$tool" ]] || { echo "error: $tool missing after install" >&2; exit 1; }
done

# Debian's own python3 is "externally managed" (PEP 668); on a throw-away CI machine install anyway.
pip_args=()
externally_managed="$("$PYTHON" - <<'PY'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print(int(sys.prefix == sys.base_prefix and os.path.isfile(marker)))
PY
)"
if [[ "$externally_managed" == 1 ]]; then
    pip_args+=(--break-system-packages)
fi
cd "$REPO_ROOT"
"$PYTHON" -m pip install "${pip_args[@]}" -e '.[test]'
