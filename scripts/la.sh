#!/usr/bin/env bash
# The left atrium (the SFR paper's dataset, 80 LGE-MRI volumes at 0.625 mm) trained on a CPU
# with cpu-small: the first N cases of dataset.json labelled, scored with `sfr evaluate` on
# cases 60-79 of dataset.json (20 volumes, touched by no run) at their own 0.625 mm grid.
#
#   scripts/la.sh [DATA] [OUT]      DATA: default ../shared/data/la2018
#   LABELED="4"               labelled counts (the first N cases of dataset.json)
#   ROWS="supervised"         supervised, mean-teacher-sfr (SFR with a mean teacher)
#   SPACINGS="native 1.25 1.7 default"   native: the median 0.625 mm (patch_context 0); a number:
#                             that isotropic spacing; default: the preset's own choice;
#                             patch-XxYxZ-S: that patch at that isotropic spacing (stride half of it)
#   SEEDS="1 2 3"  UNLABELED=16 (SFR rows: the next cases after the labelled ones)  SFR_THREADS=2
# Finished runs (OUT/<row>-<N>-<spacing>-<seed>.json: sfr evaluate --json plus train_s and the
# training check; scripts/train_and_score.sh) are kept and skipped on a rerun.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
source "$here/scripts/train_and_score.sh"
data="${1:-$here/../shared/data/la2018}"
out="${2:-$here/experiments/results/la}"
sfr="${SFR_BIN:-$here/target/release/sfr}"
unlabeled="${UNLABELED:-16}"
[ -f "$data/dataset.json" ] || { echo "la: $data/dataset.json not found (the left atrium data of ../shared/data)" >&2; exit 2; }
mkdir -p "$out"
for n in ${LABELED:-4}; do
  python3 - "$data" "$out" "$n" "$unlabeled" <<'PY'
import json, os, sys
d = json.load(open(os.path.join(sys.argv[1], "dataset.json")))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
n, k = int(sys.argv[3]), int(sys.argv[4])
assert len(ids) >= 80, len(ids)
assert n + k <= 60, f"{n} labelled + {k} unlabelled reach into the test cases 60-79"
open(os.path.join(sys.argv[2], "test_cases.txt"), "w").write("\n".join(ids[60:80]) + "\n")
open(os.path.join(sys.argv[2], f"labeled-{n}.txt"), "w").write("\n".join(ids[:n]) + "\n")
PY
done
threads='"threads": '"${SFR_THREADS:-2}"
for seed in ${SEEDS:-1 2 3}; do
  for n in ${LABELED:-4}; do
    for row in ${ROWS:-supervised}; do
      for sp in ${SPACINGS:-native 1.25 1.7 default}; do
        name="$row-$n-$sp-$seed"
        case "$sp" in
          native) set="{$threads, \"patch_context\": 0}" ;;
          patch-*)
            IFS=- read -r _ dims s <<<"$sp"
            IFS=x read -r px py pz <<<"$dims"
            set="{$threads, \"spacing\": [$s, $s, $s], \"patch\": [$px, $py, $pz], \"inference\": {\"stride\": [$((px / 2)), $((py / 2)), $((pz / 2))]}}" ;;
          default) set="{$threads}" ;;
          *) set="{$threads, \"spacing\": [$sp, $sp, $sp]}" ;;
        esac
        case "$row" in
          # Only the labelled cases are read (--max-unlabeled 0): the test cases stay untouched.
          supervised) how=(--method supervised --no-sam --max-unlabeled 0) ;;
          # The next $unlabeled cases after the labelled ones, all before the test cases.
          mean-teacher-sfr) how=(--method mean-teacher --sfr --max-unlabeled "$unlabeled") ;;
          *) echo "la: unknown row $row (supervised, mean-teacher-sfr)" >&2; exit 2 ;;
        esac
        train_and_score "$name" "$out" "$data" "$out/test_cases.txt" --labeled-list "$out/labeled-$n.txt" "${how[@]}" \
          --preset cpu-small --seed "$seed" --set "$set"
      done
    done
  done
done
