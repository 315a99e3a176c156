"""Reference values for tests/metrics.rs: segmentation metrics on real label pairs.

Independent of our Rust code: scipy's binary_erosion / distance_transform_edt with medpy 0.5.2's
formulas (medpy.metric.binary dc, jc, asd, assd, hd, hd95 and __surface_distances) written out,
so medpy itself need not be installed. If medpy happens to be importable, its own functions are
also run and must agree exactly.

Arrays stay in nibabel's [i, j, k] order, so `sampling` is (sx, sy, sz); the Rust side holds
[k, j, i] and must map spacing to axes itself, which is part of what is tested.

Pairs (same table in tests/metrics.rs): pred = shift(crop(A)), ref = crop(B), where crop keeps
[:n] along each axis with n the smaller size of A and B, and shift moves voxels by (di, dj, dk)
with zero fill. `spacing` overrides the header's (checked equal to it when not an override),
to test anisotropic voxels on real shapes.

Usage: python tests/reference/metrics_reference.py /work/shared/data
Prints the Rust constant table to paste into tests/metrics.rs.
"""
import os
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

H = "hippocampus/labelsTr/"
LA0 = "la2018/labelsTr/06SR5RBREL16DQ6M8LWS.nii.gz"
LA1 = "la2018/labelsTr/0RZDK210BSMWAA6467LU.nii.gz"

# name, A, B, shift (di, dj, dk) applied to A, spacing (sx, sy, sz), header spacing?, classes
PAIRS = [
    ("hippo001_shift_i", H + "hippocampus_001.nii.gz", H + "hippocampus_001.nii.gz", (1, 0, 0), (1.0, 1.0, 1.0), True, (1, 2)),
    ("hippo001_shift_jk_aniso", H + "hippocampus_001.nii.gz", H + "hippocampus_001.nii.gz", (0, 1, -2), (0.7, 1.3, 2.9), False, (1, 2)),
    ("hippo003_vs_004", H + "hippocampus_003.nii.gz", H + "hippocampus_004.nii.gz", (0, 0, 0), (1.0, 1.0, 1.0), True, (1, 2)),
    ("hippo003_vs_004_aniso", H + "hippocampus_003.nii.gz", H + "hippocampus_004.nii.gz", (0, 0, 0), (1.6, 0.9, 0.45), False, (1, 2)),
    ("la0_shift", LA0, LA0, (2, -1, 1), (0.625, 0.625, 0.625), True, (1,)),
    ("la0_vs_la1", LA0, LA1, (0, 0, 0), (0.625, 0.625, 0.625), True, (1,)),
]


def shift(a, d):
    out = np.zeros_like(a)
    src = tuple(slice(max(0, -s), n - max(0, s)) for n, s in zip(a.shape, d))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for n, s in zip(a.shape, d))
    out[dst] = a[src]
    return out


def surface_distances(result, reference, sampling):
    """medpy 0.5.2 __surface_distances, connectivity 1."""
    fp = generate_binary_structure(result.ndim, 1)
    result_border = result ^ binary_erosion(result, structure=fp, iterations=1)
    reference_border = reference ^ binary_erosion(reference, structure=fp, iterations=1)
    dt = distance_transform_edt(~reference_border, sampling=sampling)
    return dt[result_border]


def metrics(p, r, sampling):
    inter = np.count_nonzero(p & r)
    dice = 2.0 * inter / float(np.count_nonzero(p) + np.count_nonzero(r))
    jac = float(inter) / float(np.count_nonzero(p | r))
    d1 = surface_distances(p, r, sampling)
    d2 = surface_distances(r, p, sampling)
    pooled = np.hstack((d1, d2))
    return dict(dice=dice, jaccard=jac, asd=d1.mean(), assd=np.concatenate([d1, d2]).mean(),
                hd=max(d1.max(), d2.max()), hd95=np.percentile(pooled, 95))


def load(root, rel):
    img = nib.load(os.path.join(root, rel))
    a = np.asarray(img.dataobj)
    assert a.ndim == 3, rel
    return np.rint(a).astype(np.int32), tuple(float(z) for z in img.header.get_zooms()[:3])


def main():
    root = sys.argv[1]
    try:
        from medpy.metric import binary as medpy_binary  # optional cross-check
    except ImportError:
        medpy_binary = None
    print("// name, class, dice, jaccard, asd, assd, hd, hd95")
    for name, fa, fb, d, spacing, from_header, classes in PAIRS:
        a, za = load(root, fa)
        b, zb = load(root, fb)
        if from_header:
            assert np.allclose(za, spacing) and np.allclose(zb, spacing), (name, za, zb)
        n = tuple(min(x, y) for x, y in zip(a.shape, b.shape))
        crop = tuple(slice(0, m) for m in n)
        pred_lab = shift(a[crop], d)
        ref_lab = b[crop]
        for c in classes:
            p, r = pred_lab == c, ref_lab == c
            m = metrics(p, r, spacing)
            if medpy_binary is not None:
                got = dict(dice=medpy_binary.dc(p, r), jaccard=medpy_binary.jc(p, r),
                           asd=medpy_binary.asd(p, r, spacing), assd=medpy_binary.assd(p, r, spacing),
                           hd=medpy_binary.hd(p, r, spacing), hd95=medpy_binary.hd95(p, r, spacing))
                assert got == m, (name, c, got, m)
            vals = ", ".join(repr(float(m[k])) for k in ("dice", "jaccard", "asd", "assd", "hd", "hd95"))
            print(f'    ("{name}", {c}, {vals}),')
    if medpy_binary is not None:
        print(f"// medpy {getattr(sys.modules.get('medpy'), '__version__', '?')} agreed exactly", file=sys.stderr)


if __name__ == "__main__":
    main()
