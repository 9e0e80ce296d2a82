#!/usr/bin/env bash
# Mutation testing (mutmut) over the decisions where a wrong line would pass silently: change
# capture and sweep planning, push planning, delivery retries and refusals, secret masking
# (the modules and tests are listed under [tool.mutmut] in pyproject.toml).
#
# Every mutant must be killed by a unit test, or be listed, with the reason it cannot be
# killed, in the README's "Mutation testing" section. A survivor that is not listed fails the
# run; so does a listed one that a test now kills (keep the list honest).
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf mutants
# mutmut redraws one progress line per mutant: keep its output in a log, show its last state
# (the counts by verdict) and its exit code, and all of it when it gave no verdicts at all.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
.venv/bin/mutmut run --max-children "${MUTMUT_CHILDREN:-2}" >"$log" 2>&1
rc=$?
set -e
echo "mutmut run exited $rc; its last line: $(tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1)"
results=$(.venv/bin/mutmut results --all true 2>/dev/null || true)
total=$(grep -c ': ' <<<"$results" || true)
if [ "$total" -eq 0 ]; then
  echo "mutmut produced no mutants (a failing clean run, or nothing to mutate); its output:"
  tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 40 | sed 's/^/  /'
  exit 1
fi
survived=$(grep ': survived$' <<<"$results" | sed 's/^ *//; s/: survived$//' | sort)
# A mutant that makes the tests hang (a timeout) was caught as surely as a failing one.
unfinished=$(grep -Ev ': (killed|survived|timeout)$' <<<"$results" | grep ': ' || true)
explained=$(grep -oE '`exporter\.[A-Za-z0-9_.ǁ]+__mutmut_[0-9]+`' README.md | tr -d '`' | sort -u)

killed=$(grep -cE ': (killed|timeout)$' <<<"$results" || true)
echo "mutants: $total, killed: $killed, survived: $(grep -c . <<<"$survived" || true)," \
  "score: $((100 * killed / total))%"
status=0
if [ -n "$unfinished" ]; then
  echo "mutants that did not run to a verdict (timeout, error, not checked):"
  sed 's/^/  /' <<<"$unfinished"
  status=1
fi
unexplained=$(comm -23 <(echo "$survived") <(echo "$explained") | grep . || true)
if [ -n "$unexplained" ]; then
  echo "survivors not explained in README.md (kill them with a test, or explain them there):"
  while read -r name; do
    echo "  $name"
    .venv/bin/mutmut show "$name" 2>/dev/null | grep -E '^[-+] ' | sed 's/^/      /'
  done <<<"$unexplained"
  status=1
fi
stale=$(comm -13 <(echo "$survived") <(echo "$explained") | grep . || true)
if [ -n "$stale" ]; then
  echo "explained in README.md but killed now (remove them from the list):"
  sed 's/^/  /' <<<"$stale"
  status=1
fi
[ "$status" -eq 0 ] && echo "every surviving mutant is explained in README.md"
exit "$status"
