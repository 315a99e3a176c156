#!/usr/bin/env bash
# Why training slows under CPU contention: `sfr bench --only contention` (the supervised step
# quiet and beside one busy process, with libtorch's default threads, one thread, and auto)
# once per hypothesis. libgomp reads OMP_WAIT_POLICY / GOMP_SPINCOUNT and glibc its malloc
# settings when the process starts, so each variant is a fresh process with its environment.
#
#   scripts/bench_contention_env.sh [REPS] [VARIANT...]     (default: 10 reps, every variant)
#
# Prints one line per variant (seconds per step, and busy / quiet of the default threads) and
# keeps the JSON of each run in $OUT_DIR (default: target/bench-contention).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
SFR=${SFR:-./target/release/sfr}
REPS=${1:-10}
shift || true
OUT_DIR=${OUT_DIR:-target/bench-contention}
mkdir -p "$OUT_DIR"

declare -A ENVS=(
  [default]=""
  [passive]="OMP_WAIT_POLICY=passive"
  [active]="OMP_WAIT_POLICY=active"
  [spin10k]="GOMP_SPINCOUNT=10000"
  [malloc_keep]="MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456"
)
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(default passive active spin10k malloc_keep)

printf '%-12s %-17s %8s %8s %8s | %8s %8s %8s | %s\n' variant load_start q_def q_1 q_auto b_def b_1 b_auto "busy/quiet_def: def 1 auto; auto's thread counts"
for v in "${VARIANTS[@]}"; do
  [ -v "ENVS[$v]" ] || { echo "unknown variant $v (known: ${!ENVS[*]})" >&2; exit 2; }
  f="$OUT_DIR/$v-$(date +%H%M%S).json"
  # shellcheck disable=SC2086
  env ${ENVS[$v]} "$SFR" bench --only contention --reps "$REPS" >"$f" 2>/dev/null
  jq -r --arg v "$v" '.retrain.contention as $c | .machine as $m |
    [$v, ($m.loadavg_start | map(tostring) | join(",")),
     ($c.quiet_seconds.fixed_default, $c.quiet_seconds.fixed_1, $c.quiet_seconds.auto,
      $c.busy_seconds.fixed_default, $c.busy_seconds.fixed_1, $c.busy_seconds.auto | . * 1000 | round / 1000 | tostring),
     ([$c.busy_vs_quiet.fixed_default, $c.busy_vs_quiet.fixed_1, $c.busy_vs_quiet.auto] | map(. * 100 | round / 100 | tostring) | join(" ")),
     ("auto threads:steps quiet \($c.auto.quiet.steps_by_threads | tojson) busy \($c.auto.busy.steps_by_threads | tojson)")] |
    "\(.[0]) \(.[1]) \(.[2]) \(.[3]) \(.[4]) | \(.[5]) \(.[6]) \(.[7]) | \(.[8]); \(.[9])"' "$f" |
    awk '{printf "%-12s %-17s %8s %8s %8s | %8s %8s %8s | %s %s %s", $1,$2,$3,$4,$5,$7,$8,$9,$11,$12,$13; for (i = 14; i <= NF; i++) printf " %s", $i; printf "\n"}'
done
