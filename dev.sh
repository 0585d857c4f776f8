#!/usr/bin/env bash
# One-command set-up for a fresh machine.
#   ./dev.sh run    install (venv in .venv), migrate, start the node on its embedded defaults
#   ./dev.sh test   install (system peers + venv), run the test suite
#   ./dev.sh fast   the fast lane between edits: unit tests on SQLite
# Extra arguments go to `pe-triage run` or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PETRIAGE_VENV:-.venv}
PY=${PYTHON:-python3}

# dcmtk by its own path: pynetdicom installs programs called storescu/storescp/echoscu
# into the venv, and with the venv first on PATH they would stand in for dcmtk's.
DCMTK=/usr/bin

is_dcmtk() {
  # the whole output first: `| grep -q` stops reading at the match, and under pipefail
  # the program's SIGPIPE would fail the check now and then
  local version
  [ -x "$DCMTK/$1" ] && version=$("$DCMTK/$1" --version 2>/dev/null) && [[ $version == *dcmtk* ]]
}

need_peers() {
  is_dcmtk storescu && is_dcmtk storescp && is_dcmtk echoscu && [ -x "$DCMTK/dcmcjpls" ] \
    && command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
    && command -v dciodvfy >/dev/null && command -v chromium >/dev/null
}

install_peers() {
  need_peers && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "dev.sh: the tests need dcmtk, orthanc, orthanc-dicomweb, dicom3tools and chromium (Debian packages); run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends dcmtk orthanc orthanc-dicomweb dicom3tools chromium >/dev/null
  if ! is_dcmtk storescu; then
    echo "dev.sh: $DCMTK/storescu is not dcmtk's (the tests need dcmtk's storescu/storescp/echoscu there)" >&2
    exit 1
  fi
}

start_postgres() {
  command -v pg_isready >/dev/null || return 0
  pg_isready -q -h 127.0.0.1 -p 5432 && return 0
  command -v pg_ctlcluster >/dev/null && pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 1; done
}

install_venv() {
  if [ ! -x "$VENV/bin/pe-triage" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$VENV/.installed"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  run)
    install_venv
    exec "$VENV/bin/pe-triage" run "$@"
    ;;
  test)
    install_peers
    start_postgres
    install_venv
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then
      echo "dev.sh: pytest collected no tests" >&2
      rc=0
    fi
    exit "$rc"
    ;;
  fast)
    install_venv
    exec "$VENV/bin/python" -m pytest tests/unit -m "not slow and not postgres" -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh run|test|fast [args...]" >&2
    exit 2
    ;;
esac
