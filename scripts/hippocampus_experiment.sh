#!/usr/bin/env bash
# Semi-supervised methods on real data: MSD hippocampus, preset cpu-small, the first 4 cases of
# dataset.json labelled (all used for training), the next N_UNLABELED (146) unlabelled (their labels never
# read in training), the last 50 held out for testing (never touched in training). Every row
# gets the same budget; each row runs with several seeds and the table gives mean ± std over
# the seeds of the per-seed mean Dice on the 50 test cases, per class.
#
#   scripts/hippocampus_experiment.sh [DATA] [OUT]
#   SEEDS="2026 2027 2028"   seeds (default three)
#   ROWS="supervised mean-teacher ..."   which rows (default: all below)
#   SET='{"vnet": {"iterations": 1000}}'   extra config overrides for every row (budget)
#   SFR_THREADS=2            threads per run
#   N_UNLABELED=146          unlabelled cases (the cases after the labelled ones)
# Finished runs (OUT/<row>-<seed>.json) are kept and skipped on a rerun.
# The SFR rows of one seed share one SAM stage: the first writes its pseudo-labels
# (OUT/sam-<seed>/pseudo), the others train on them (`--pseudo-labels`), which gives exactly the
# V-Net of running SAM again (tests/pipeline.rs, pseudo_labels_from_a_folder_train_the_same_model).
# SFR+ runs its own SAM stage (it fine-tunes SAM again between its rounds).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/env.sh"
data="${1:-$here/../shared/data/hippocampus}"
out="${2:-$here/experiments/hippocampus}"
sfr="${SFR_BIN:-$here/target/release/sfr}"
seeds="${SEEDS:-2026 2027 2028}"
rows="${ROWS:-supervised self-training mean-teacher acmt supervised-sfr self-training-sfr mean-teacher-sfr acmt-sfr mean-teacher-sfr-plus}"
extra="${SET:-{\}}"
n_unlabeled="${N_UNLABELED:-146}"
mkdir -p "$out"
# one --set: the thread count merged into the user's overrides
set="$(python3 -c 'import json, sys; d = json.loads(sys.argv[1]); d.setdefault("threads", int(sys.argv[2])); print(json.dumps(d))' "$extra" "${SFR_THREADS:-0}")"
python3 - "$data" "$out/test_cases.txt" <<'PY'
import json, sys, os
d = json.load(open(os.path.join(sys.argv[1], "dataset.json")))
ids = [os.path.basename(t["image"]).replace(".nii.gz", "") for t in d["training"]]
assert len(ids) >= 200, len(ids)
open(sys.argv[2], "w").write("\n".join(ids[150:200]) + "\n")
PY

args_of() {
  case "$1" in
    supervised) echo "--method supervised --no-sam" ;;
    self-training) echo "--method self-training --no-sam" ;;
    mean-teacher) echo "--method mean-teacher --no-sam" ;;
    acmt) echo "--method acmt --no-sam" ;;
    supervised-sfr) echo "--method supervised --sfr" ;;
    self-training-sfr) echo "--method self-training --sfr" ;;
    mean-teacher-sfr) echo "--method mean-teacher --sfr" ;;
    acmt-sfr) echo "--method acmt --sfr" ;;
    mean-teacher-sfr-plus) echo "--method mean-teacher --sfr-plus" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

# Seed-major: a run cut short still leaves whole tables for the seeds it finished.
for seed in $seeds; do
  for row in $rows; do
    name="$row-$seed"
    [ -f "$out/$name.json" ] && { echo "== $name (done)"; continue; }
    echo "== $name"
    start=$(date +%s)
    sam=()
    case "$row" in
      *-sfr)
        if [ -f "$out/sam-$seed/done" ]; then sam=(--pseudo-labels "$out/sam-$seed/pseudo")
        else rm -rf "$out/sam-$seed"; sam=(--work-dir "$out/sam-$seed" --write-pseudo-labels); fi ;;
    esac
    # shellcheck disable=SC2046
    "$sfr" train --data "$data" --labeled 4 --max-unlabeled "$n_unlabeled" --preset cpu-small --seed "$seed" --progress none \
      --set "$set" --out "$out/$name.sfrmodel" $(args_of "$row") "${sam[@]}" 2> "$out/$name.log"
    [ "${sam[0]:-}" = --work-dir ] && touch "$out/sam-$seed/done"
    end=$(date +%s)
    "$sfr" evaluate --model "$out/$name.sfrmodel" --data "$data" --cases "$out/test_cases.txt" --json > "$out/$name.json.tmp"
    python3 - "$out/$name.json.tmp" "$((end - start))" "${sam[0]:-}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["train_s"] = int(sys.argv[2])
# A row that read another row's pseudo-labels: its time has no SAM stage in it.
r["sam_stage_shared"] = sys.argv[3] == "--pseudo-labels"
json.dump(r, open(sys.argv[1], "w"))
PY
    mv "$out/$name.json.tmp" "$out/$name.json"
  done
done

python3 - "$out" $rows <<'PY' | tee "$out/results.md"
import json, os, sys, statistics as st
out, rows = sys.argv[1], sys.argv[2:]
print("| run | seeds | anterior Dice (%) | posterior Dice (%) | mean Dice (%) | train s |")
print("|---|---|---|---|---|---|")
for row in rows:
    runs = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith(row + "-") and f.endswith(".json") and f[len(row) + 1:-5].isdigit()]
    if not runs:
        continue
    per_class = list(zip(*[[c["dice_mean"] for c in r["summary"]] for r in runs]))
    means = [sum(c) / len(c) for c in zip(*per_class)]
    f = lambda v: f"{100 * st.mean(v):.1f} ± {100 * (st.stdev(v) if len(v) > 1 else 0):.1f}"
    cells = " | ".join(f(c) for c in per_class)
    print(f"| {row} | {len(runs)} | {cells} | {f(means)} | {st.mean(r['train_s'] for r in runs):.0f} |")
PY
