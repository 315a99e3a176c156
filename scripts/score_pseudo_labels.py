#!/usr/bin/env python3
"""Scores SAM's pseudo-labels (a training run's `--write-pseudo-labels` folder) against the true
labels of the same cases: per-class Dice, and the mean over cases.

  score_pseudo_labels.py PSEUDO_DIR DATA_DIR [--json OUT.json]

PSEUDO_DIR holds `<id>_pseudo.nii.gz`; DATA_DIR is the Decathlon folder with labelsTr/<id>.nii.gz.
A pseudo-label on another grid than its label (training at a coarser spacing) is taken to the
label's grid by nearest neighbour through both headers' affines, so it is scored at the
label's own resolution, as `sfr evaluate` scores a model. Needs numpy, nibabel and scipy (the
set-up's Python environment has them).
"""
import argparse, json, os, statistics as st
import nibabel as nib
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("pseudo")
ap.add_argument("data")
ap.add_argument("--json")
a = ap.parse_args()
ids = sorted(f[: -len("_pseudo.nii.gz")] for f in os.listdir(a.pseudo) if f.endswith("_pseudo.nii.gz"))
if not ids:
    raise SystemExit(f"score_pseudo_labels: no <id>_pseudo.nii.gz in {a.pseudo}")
# Every foreground class of dataset.json is scored in every case; one absent from both the
# pseudo-label and the label counts as Dice 100 (the convention of `sfr evaluate`).
labels = json.load(open(os.path.join(a.data, "dataset.json")))["labels"]
classes = sorted(int(k) for k in labels if int(k) > 0)
per_case = {}
for i in ids:
    pn = nib.load(os.path.join(a.pseudo, f"{i}_pseudo.nii.gz"))
    tn = nib.load(os.path.join(a.data, "labelsTr", f"{i}.nii.gz"))
    p = np.asarray(pn.dataobj).astype(np.int64)
    t = np.asarray(tn.dataobj).astype(np.int64)
    if p.shape != t.shape or not np.allclose(pn.affine, tn.affine, atol=1e-4):
        # Label voxel -> world -> pseudo-label voxel, nearest neighbour; outside it: background.
        from scipy.ndimage import map_coordinates
        m = np.linalg.inv(pn.affine) @ tn.affine
        grid = np.indices(t.shape).reshape(3, -1)
        coords = m[:3, :3] @ grid + m[:3, 3:4]
        p = map_coordinates(p, coords, order=0, mode="constant", cval=0).reshape(t.shape)
    d = {}
    for c in classes:
        tp = np.sum((p == c) & (t == c)); s = np.sum(p == c) + np.sum(t == c)
        d[c] = 100.0 * 2 * tp / s if s else 100.0
    per_case[i] = d
mean = {c: st.mean(d[c] for d in per_case.values()) for c in classes}
print(f"{len(ids)} cases: " + ", ".join(f"class {c} {mean[c]:.1f}" for c in classes) + f"; mean {st.mean(mean.values()):.1f}")
if a.json:
    json.dump({"cases": per_case, "mean": mean, "overall": st.mean(mean.values())}, open(a.json, "w"), indent=1)
