#!/usr/bin/env bash
# The test command (README): installs what is missing, then runs ruff and the test suite.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
export PATH="$HOME/.local/bin:$PATH"

# Real services used by integration tests (Debian packages); skipped where apt is unavailable.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc orthanc-dicomweb)
  [ -d /usr/lib/postgresql ] || missing+=(postgresql)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; tests that need them will say so"
  fi
fi

uv sync --locked --quiet
# Property-based tests run derandomised (tests/conftest.py); HYPOTHESIS_PROFILE=explore draws anew.
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
uv run --locked ruff check .
set +e
# Two pytest-xdist workers (the test machine has 2 cores), each test module whole on one worker
# (its module-scoped fixtures set up once); ONCOFLOW_TEST_WORKERS=0 runs in this one process.
# (--dist loadgroup does not group with pytest 9.2: xdist 3.8 renames node ids pytest now derives.)
uv run --locked pytest -m "not slow" -n "${ONCOFLOW_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
