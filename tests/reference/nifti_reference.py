"""nibabel's view of NIfTI files, in the geometry convention of ITK (LPS), as JSON lines.

Usage: python nifti_reference.py FILE [FILE ...]
For each file prints one JSON object: dims, spacing, origin, direction (row-major, LPS),
min, max, and two float64 checksums of the voxels in x-fastest order (plain sum and a
position-weighted sum that changes under any transpose or flip).
"""
import json
import sys

import nibabel as nib
import numpy as np


def describe(path):
    img = nib.load(path)
    a = img.affine  # nibabel's best affine: sform if sform_code > 0, else qform, else base
    m = a[:3, :3]
    spacing = np.sqrt((m ** 2).sum(axis=0))
    ras_dir = m / spacing
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = lps @ ras_dir
    origin = lps @ a[:3, 3]
    data = np.asanyarray(img.dataobj).astype(np.float64)  # dataobj applies scl_slope/inter
    flat = data.ravel(order="F")  # x fastest, like our buffers
    weights = (np.arange(flat.size) % 1009).astype(np.float64)
    return {
        "file": path,
        "dims": list(img.shape),
        "spacing": spacing.tolist(),
        "origin": origin.tolist(),
        "direction": direction.ravel().tolist(),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "sum": float(flat.sum()),
        "wsum": float((flat * weights).sum()),
    }


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(describe(p)))
