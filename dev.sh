#!/usr/bin/env bash
# Set up the project (once; again only when pyproject.toml or constraints.txt change) and run a job.
#   ./dev.sh demo [--out DIR] [--section B4]   the end-to-end demo (`stfm demo`)
#   ./dev.sh test [pytest args]                the test suite
#   ./dev.sh docs                              the docs (Sphinx, warnings as errors) → docs/_build/html
#   ./dev.sh setup                             only set up
set -euo pipefail
cd "$(dirname "$0")"
unset PYTHONDONTWRITEBYTECODE  # let Python cache bytecode: imports of this stack are 2x faster
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.stfm-setup"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  start=$(date +%s)
  echo "[dev.sh] setting up $VENV (pinned by constraints.txt) …"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }  # local-index noise
  "$VENV/bin/python" -m pip install -q --upgrade pip 2> >(quiet)
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]" 2> >(quiet)
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV"/lib/python*/site-packages >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
  echo "[dev.sh] set up in $(( $(date +%s) - start )) s"
fi
# Real data: the local mirror beside the repository when there is one (else stfm downloads, checksummed).
if [ -z "${STFM_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  STFM_DATA_DIR="$(cd ../shared/data && pwd)"
  export STFM_DATA_DIR
fi
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
export MPLBACKEND="${MPLBACKEND:-Agg}"
job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec "$VENV/bin/stfm" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  docs) exec "$VENV/bin/python" -m sphinx -W --keep-going -b html docs docs/_build/html "$@" ;;
  setup) echo "[dev.sh] ready: $VENV" ;;
  *) echo "usage: ./dev.sh demo|test|docs|setup [args]" >&2; exit 2 ;;
esac
