#!/usr/bin/env bash
# Regenerates the tables of docs/results.md: runs the trainings behind each table (through
# scripts/robustness.sh, which trains with `sfr train`, scores on the 60 test cases 100..159 of
# the hippocampus data with `sfr evaluate` and keeps one JSON per run), then rewrites each table
# of docs/results.md (between its `<!-- results:NAME -->` markers) from those JSON files, and
# the plot of every run, docs/results-dice.svg, and the demo's figures (scripts/results_tables.py).
#
#   scripts/results.sh [DATA] [OUT]       DATA: MSD hippocampus (default ../shared/data/hippocampus)
#   TABLES="demo robustness sfr few-labels sfr-few ablation la-spacing la-patch la"  which tables (default: all)
#   SEEDS="1 2 3 4 5"  SETS="A B C"       seeds and labelled sets of the robustness table
#   FEW_SEEDS="1 2 3 4 5"                 seeds of the few-labels table (one labelled case)
#   SFR_SEEDS="1 2 3"                     seeds of the sfr table (SFR beside supervised, sets SETS)
#   LA_DATA=../shared/data/la2018  LA_SEEDS="1 2 3"   the left atrium tables (scripts/la.sh)
#   RUN=0                                 no training: rewrite the tables from the JSON in OUT
#   SET='{...}'                           config overrides for every run (e.g. a small budget to
#                                         try the script; such runs are not the documented ones)
#   RESULTS_DOC=docs/results.md           the file whose tables are rewritten
#   SFR_THREADS=0                         threads per run (0: the free cores)
# Runs are kept in OUT (default experiments/results; OUT/runs for the shared runs, OUT/ablation-*
# for the head/dropout variants) and skipped on a rerun, so an interrupted regeneration resumes
# where it stopped. On 2 cores a cpu-small supervised run takes about 2 minutes and an SFR run a
# few more; every table at once is about 25 runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
data="${1:-$here/../shared/data/hippocampus}"
out="${2:-$here/experiments/results}"
tables="${TABLES:-demo robustness sfr few-labels sfr-few ablation la-spacing la-patch la}"
doc="${RESULTS_DOC:-$here/docs/results.md}"
extra="${SET:-{\}}"
runs="$out/runs"
mkdir -p "$out"

robustness() { "$here/scripts/robustness.sh" "$data" "$@"; }
# The user's overrides with a table's own merged in (the table's win).
merge() { python3 -c 'import json, sys
def m(a, b):
    for k, v in b.items():
        a[k] = m(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a
print(json.dumps(m(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))' "$extra" "$1"; }

if [ "${RUN:-1}" != 0 ]; then
  for t in $tables; do
    echo "== table $t"
    case "$t" in
      # The demo on the scans shipped in demo/hippocampus, with SAM's pseudo-label curve: its
      # table, pictures, and plots of the curve and of time per stage.
      demo) [ -f "$out/demo/results.json" ] || "$here/target/release/sfr" demo --out "$out/demo" --pseudo-label-curve 7 --progress none ;;
      robustness) LABELED=4 SETS="${SETS:-A B C}" SEEDS="${SEEDS:-1 2 3 4 5}" ROWS=supervised SET="$extra" robustness "$runs" ;;
      sfr) LABELED=4 SETS="${SETS:-A B C}" SEEDS="${SFR_SEEDS:-1 2 3}" ROWS="supervised mean-teacher-sfr" SET="$extra" robustness "$runs" ;;
      sfr-few) LABELED=1 SETS=A SEEDS=1 ROWS="supervised mean-teacher-sfr mean-teacher-sfr-lora" SET="$extra" robustness "$runs" ;;
      few-labels) LABELED="1 2" SETS="A B C" SEEDS="${FEW_SEEDS:-1 2 3 4 5}" ROWS=supervised SET="$extra" robustness "$runs" ;;
      la-spacing) LABELED=4 ROWS=supervised SPACINGS="native 1.25 1.7 default" SEEDS="${LA_SEEDS:-1 2 3}" \
        "$here/scripts/la.sh" "${LA_DATA:-$here/../shared/data/la2018}" "$out/la" ;;
      # The patch patch_budget plans from the foreground (cpu-small's budget), at the spacing
      # the plan gives (1.15 mm) and at the preset's 1.7 mm; the preset's own is la-spacing's.
      la-patch) LABELED=4 ROWS=supervised SPACINGS="default patch-48x32x32-1.15 patch-48x32x32-1.7" SEEDS="${LA_SEEDS:-1 2 3}" \
        "$here/scripts/la.sh" "${LA_DATA:-$here/../shared/data/la2018}" "$out/la" ;;
      la) LABELED="1 4 16" ROWS="supervised mean-teacher-sfr" SPACINGS=default SEEDS="${LA_SEEDS:-1 2 3}" \
        "$here/scripts/la.sh" "${LA_DATA:-$here/../shared/data/la2018}" "$out/la" ;;
      ablation)
        # class-prior head without dropout is the preset itself: the robustness table's run
        LABELED=4 SETS=A SEEDS=1 ROWS=supervised SET="$extra" robustness "$runs"
        for v in random-0.5 random-0 prior-0.5; do
          head=true; [ "${v%-*}" = random ] && head=false
          LABELED=4 SETS=A SEEDS=1 ROWS=supervised SET="$(merge "{\"vnet\": {\"head_bias_prior\": $head, \"dropout\": ${v#*-}}}")" \
            robustness "$out/ablation-$v"
        done ;;
      *) echo "results: unknown table $t (demo, robustness, sfr, few-labels, sfr-few, ablation, la-spacing, la-patch, la)" >&2; exit 2 ;;
    esac
  done
fi

python3 "$here/scripts/results_tables.py" "$out" "$doc" $tables
