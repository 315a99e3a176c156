# Sourced by the experiment scripts (robustness.sh, la.sh): one run, trained with `sfr train`
# and scored with `sfr evaluate` on a fixed list of test cases, kept as OUT/NAME.json (the
# evaluation, plus `train_s` and the model's training check `class_check`) beside
# OUT/NAME.sfrmodel and OUT/NAME.log. A run whose JSON exists is skipped, so an interrupted
# script resumes where it stopped; the JSON appears only when the run is complete.
#
#   train_and_score NAME OUT DATA TEST_CASES [sfr train arguments ...]
# needs $sfr (the binary).
train_and_score() {
  local name="$1" out="$2" data="$3" cases="$4"
  shift 4
  [ -f "$out/$name.json" ] && return 0
  echo "== $name"
  local start end
  start=$(date +%s)
  # --allow-weak: a run whose check fails is kept and counted, not dropped.
  "$sfr" train --data "$data" "$@" --progress none --allow-weak \
    --out "$out/$name.sfrmodel" --work-dir "$out/$name.work" 2> "$out/$name.log"
  end=$(date +%s)
  "$sfr" evaluate --model "$out/$name.sfrmodel" --data "$data" --cases "$cases" --json > "$out/$name.json.tmp" 2>> "$out/$name.log"
  "$sfr" info "$out/$name.sfrmodel" > "$out/$name.info.json"
  python3 - "$out/$name.json.tmp" "$out/$name.info.json" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = json.load(open(sys.argv[2]))["training"]
r["train_s"] = int(sys.argv[3])
r["class_check"] = t.get("class_check")
json.dump(r, open(sys.argv[1], "w"))
PY
  rm -f "$out/$name.info.json"
  rm -rf "$out/$name.work"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
