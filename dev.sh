#!/usr/bin/env bash
# One-command set-up for a fresh machine.
#   ./dev.sh run    install (venv in .venv), migrate, start the node on its embedded defaults
#   ./dev.sh test   install (system peers + venv), run the test suite
# Extra arguments go to `pe-triage run` or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PETRIAGE_VENV:-.venv}
PY=${PYTHON:-python3}

need_peers() {
  command -v storescu >/dev/null && command -v storescp >/dev/null && command -v dcmcjpls >/dev/null \
    && command -v Orthanc >/dev/null && command -v dciodvfy >/dev/null && command -v chromium >/dev/null
}

install_peers() {
  need_peers && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "dev.sh: the tests need dcmtk, orthanc and dicom3tools (Debian packages); run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends dcmtk orthanc dicom3tools chromium >/dev/null
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
  *)
    echo "usage: ./dev.sh run|test [args...]" >&2
    exit 2
    ;;
esac
