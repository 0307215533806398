#!/usr/bin/env bash
# The whole suite, as CI runs it: install, lint, type-check, then every test tier with a summary line per tier.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
export PYTHONUNBUFFERED=1
declare -A RESULT
status=0

step() {  # name, command...
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"; local rc=$?
  # pytest exit 5 = nothing collected for this tier: not a failure of the tier itself, but visible.
  if [ $rc -eq 5 ]; then RESULT[$name]="no tests ($((SECONDS - t0)) s)"; return 0; fi
  if [ $rc -eq 0 ]; then RESULT[$name]="ok ($((SECONDS - t0)) s)"; else RESULT[$name]="FAILED rc=$rc ($((SECONDS - t0)) s)"; status=1; fi
}

step ruff .venv/bin/ruff check vduproxy tests bench
step mypy .venv/bin/mypy vduproxy
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider -rs)
step "tier1-unit" "${PYTEST[@]}" -m unit tests
step "tier2-integration" "${PYTEST[@]}" -m integration tests
step "tier3-realclients" "${PYTEST[@]}" -m realclient tests
step "tier4-kernel" "${PYTEST[@]}" -m kernel tests

echo "=== summary"
for name in ruff mypy tier1-unit tier2-integration tier3-realclients tier4-kernel; do
  printf '%-20s %s\n' "$name" "${RESULT[$name]:-not run}"
done
exit $status
