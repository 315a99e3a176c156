#!/usr/bin/env bash
# The left atrium (the SFR paper's dataset, 80 LGE-MRI volumes at 0.625 mm) trained on a CPU
# at its native spacing and at coarser ones (`spacing` in the config): supervised, cpu-small,
# the first 4 cases of dataset.json labelled, scored with `sfr evaluate` on cases 60-79 of
# dataset.json (20 volumes, touched by no run), at their own 0.625 mm grid.
#
#   scripts/la_spacing.sh [DATA] [OUT]      DATA: default ../shared/data/la2018
#   SPACINGS="native 1.25 1.7"  SEEDS="1 2 3"  SFR_THREADS=2
# Finished runs (OUT/supervised-4-<spacing>-<seed>.json: sfr evaluate --json plus train_s) are
# kept and skipped on a rerun.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
data="${1:-$here/../shared/data/la2018}"
out="${2:-$here/experiments/results/la}"
sfr="${SFR_BIN:-$here/target/release/sfr}"
[ -f "$data/dataset.json" ] || { echo "la_spacing: $data/dataset.json not found (the left atrium data of ../shared/data)" >&2; exit 2; }
mkdir -p "$out"
python3 - "$data" "$out" <<'PY'
import json, os, sys
d = json.load(open(os.path.join(sys.argv[1], "dataset.json")))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
assert len(ids) >= 80, len(ids)
open(os.path.join(sys.argv[2], "test_cases.txt"), "w").write("\n".join(ids[60:80]) + "\n")
open(os.path.join(sys.argv[2], "labeled-4.txt"), "w").write("\n".join(ids[:4]) + "\n")
PY
for seed in ${SEEDS:-1 2 3}; do
  for sp in ${SPACINGS:-native 1.25 1.7}; do
    name="supervised-4-$sp-$seed"
    [ -f "$out/$name.json" ] && continue
    echo "== $name"
    set='{"threads": '"${SFR_THREADS:-2}"'}'
    [ "$sp" = native ] || set='{"threads": '"${SFR_THREADS:-2}"', "spacing": ['"$sp, $sp, $sp"']}'
    start=$(date +%s)
    # Only the labelled cases are read (--max-unlabeled 0): the test cases stay untouched.
    "$sfr" train --data "$data" --labeled-list "$out/labeled-4.txt" --max-unlabeled 0 --preset cpu-small \
      --method supervised --no-sam --seed "$seed" --progress none --allow-weak --set "$set" \
      --out "$out/$name.sfrmodel" --work-dir "$out/$name.work" 2> "$out/$name.log"
    end=$(date +%s)
    "$sfr" evaluate --model "$out/$name.sfrmodel" --data "$data" --cases "$out/test_cases.txt" --json > "$out/$name.json.tmp" 2>> "$out/$name.log"
    python3 - "$out/$name.json.tmp" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["train_s"] = int(sys.argv[2])
json.dump(r, open(sys.argv[1], "w"))
PY
    rm -rf "$out/$name.work"
    mv "$out/$name.json.tmp" "$out/$name.json"
  done
done
