#!/usr/bin/env bash
# The issue-4 experiment on real data: MSD hippocampus, preset cpu-small, 4 labelled cases
# (the first 4 of dataset.json, all used for training: no validation split), the next 146
# unlabelled, the last 50 held out for testing (never read during training). Same seed and
# budget for every method. Writes OUT/results.md and OUT/<run>.json.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
data="${1:-$here/../shared/data/hippocampus}"
out="${2:-$here/experiments/hippocampus}"
sfr="$here/target/release/sfr"
mkdir -p "$out"
python3 - "$data" "$out/test_cases.txt" <<'PY'
import json, sys, os
d = json.load(open(os.path.join(sys.argv[1], "dataset.json")))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
assert len(ids) >= 200, len(ids)
open(sys.argv[2], "w").write("\n".join(ids[150:200]) + "\n")
PY
run() {
  name="$1"; shift
  echo "== $name"
  start=$(date +%s)
  "$sfr" train --data "$data" --labeled 4 --max-unlabeled 146 --preset cpu-small --seed 2026 --progress none --set "{\"validation_cases\": 0, \"threads\": ${SFR_THREADS:-0}}" --out "$out/$name.sfrmodel" "$@" 2> "$out/$name.log"
  end=$(date +%s)
  "$sfr" evaluate --model "$out/$name.sfrmodel" --data "$data" --cases "$out/test_cases.txt" --json > "$out/$name.json"
  python3 - "$out/$name.json" "$name" "$((end - start))" >> "$out/results.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["summary"]
cells = " | ".join(f"{100*c['dice_mean']:.2f} ± {100*c['dice_std']:.2f}" for c in s)
mean = sum(c["dice_mean"] for c in s) / len(s)
print(f"| {sys.argv[2]} | {cells} | {100*mean:.2f} | {sys.argv[3]} |")
PY
  tail -1 "$out/results.md"
}
echo "| run | Dice anterior (%) | Dice posterior (%) | mean Dice (%) | train s |" > "$out/results.md"
echo "|---|---|---|---|---|" >> "$out/results.md"
run supervised --method supervised --no-sam
run mean-teacher --method mean-teacher --no-sam
run mean-teacher-sfr --method mean-teacher --sfr
run mean-teacher-sfr-plus --method mean-teacher --sfr-plus
cat "$out/results.md"
