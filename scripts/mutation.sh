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
# mutmut draws a progress line per mutant; the summary below is what matters.
.venv/bin/mutmut run --max-children "${MUTMUT_CHILDREN:-2}" >/dev/null 2>&1 || true
results=$(.venv/bin/mutmut results --all true 2>/dev/null)
total=$(grep -c ': ' <<<"$results" || true)
survived=$(grep ': survived$' <<<"$results" | sed 's/^ *//; s/: survived$//' | sort)
# A mutant that makes the tests hang (a timeout) was caught as surely as a failing one.
unfinished=$(grep -Ev ': (killed|survived|timeout)$' <<<"$results" | grep ': ' || true)
explained=$(grep -oE '`exporter\.[A-Za-z0-9_.ǁ]+__mutmut_[0-9]+`' README.md | tr -d '`' | sort -u)

killed=$(grep -cE ': (killed|timeout)$' <<<"$results" || true)
echo "mutants: $total, killed: $killed, survived: $(grep -c . <<<"$survived" || true)"
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
