#!/usr/bin/env python3
"""Makes a Decathlon folder of thicker-slice scans: every other slice along the third voxel
axis of some cases' images and labels is dropped (spacing doubled along it, origin and
direction kept), as a scanner with 2x the slice spacing would have sampled them. Used to check
that segmentation at another spacing than the model's works (docs/results.md).

    coarse_slices.py DATA OUT FIRST COUNT    cases FIRST..FIRST+COUNT-1 of DATA's dataset.json

Writes OUT/dataset.json, OUT/imagesTr, OUT/labelsTr and OUT/cases.txt (their ids). Needs
nibabel (in the set-up's Python environment).
"""
import json
import os
import sys

import nibabel as nib
import numpy as np


def main(data, out, first, count):
    with open(os.path.join(data, "dataset.json")) as f:
        d = json.load(f)
    cases = d["training"][first:first + count]
    if len(cases) != count:
        sys.exit(f"coarse_slices: {data}/dataset.json has {len(d['training'])} cases, not {first + count}")
    rows, ids = [], []
    for t in cases:
        row = {}
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            src = os.path.join(data, t[key])
            img = nib.load(src)
            affine = img.affine.copy()
            affine[:3, 2] *= 2
            thick = nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, ::2], affine, img.header.copy())
            thick.set_sform(affine, 1)
            thick.set_qform(affine, 1)
            os.makedirs(os.path.join(out, folder), exist_ok=True)
            name = os.path.basename(src)
            nib.save(thick, os.path.join(out, folder, name))
            row[key] = f"./{folder}/{name}"
        rows.append(row)
        ids.append(os.path.basename(t["image"]).replace(".nii.gz", ""))
    d = dict(d, training=rows, numTraining=len(rows), test=[], numTest=0)
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(d, f, indent=1)
    with open(os.path.join(out, "cases.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    print(f"{len(rows)} cases with every other slice dropped in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
