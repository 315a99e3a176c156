"""Slicer IJK-to-RAS <-> libsfr LPS geometry, both ways, on oblique anisotropic matrices; and
agreement with the Rust library's own NIfTI reader (an independent implementation of the
RAS/LPS convention)."""
import json
import subprocess

import numpy as np
import pytest

from conftest import cli_path, oblique_matrix, rotation
from SFRSegmentationLib import LpsGeometry, ijk_to_ras_to_lps_geometry, lps_geometry_to_ijk_to_ras
from SFRSegmentationLib import nifti

F = np.diag([-1.0, -1.0, 1.0])


def test_axis_aligned_slicer_matrix_is_identity_direction_in_lps():
    # What Slicer shows for an ITK image with identity direction: RAS axes i -> -x, j -> -y.
    m = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    g = ijk_to_ras_to_lps_geometry(m)
    assert g.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert g.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert g.origin == pytest.approx((-10.0, -20.0, -30.0))


def test_oblique_anisotropic_matrix_converts_exactly_both_ways():
    m = oblique_matrix(spacing=(0.7, 1.3, 3.1), origin=(5.0, -7.5, 100.0))
    g = ijk_to_ras_to_lps_geometry(m)
    assert g.spacing == pytest.approx((0.7, 1.3, 3.1), abs=1e-12)
    d = g.direction_matrix()
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-12)
    assert g.origin == pytest.approx((-5.0, 7.5, 100.0), abs=1e-12)
    # Every voxel maps to the same physical point in both descriptions.
    for p in ([0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [27, 23, 19], [3.5, -2, 8]):
        ras = (m @ np.array([*p, 1.0]))[:3]
        lps = np.array(g.origin) + d @ (np.array(g.spacing) * np.array(p, dtype=float))
        assert np.allclose(F @ ras, lps, atol=1e-10)
    assert np.allclose(lps_geometry_to_ijk_to_ras(g), m, atol=1e-12)


def test_lps_geometry_round_trips_through_slicer_matrix():
    d = rotation(1, 0.4) @ rotation(2, -1.1) @ np.diag([1.0, -1.0, 1.0])  # improper: a flipped axis
    g = LpsGeometry(origin=(1.0, 2.0, -3.0), spacing=(0.5, 0.75, 4.0), direction=tuple(d.reshape(9)))
    back = ijk_to_ras_to_lps_geometry(lps_geometry_to_ijk_to_ras(g))
    assert back.is_close(g, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "bad, why",
    [
        (np.eye(3), "4x4"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "zero column"),
        (np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
        (np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]), "last row"),
        (np.full((4, 4), np.nan), "NaN"),
    ],
)
def test_bad_matrices_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        ijk_to_ras_to_lps_geometry(bad)


def test_the_rust_library_reads_our_geometry_the_same_way(tmp_path):
    """A NIfTI written with the Slicer matrix as sform, read by `sfr info` (the library's NIfTI
    reader, which returns LPS geometry), gives the geometry our conversion computes."""
    m = oblique_matrix()
    path = tmp_path / "v.nii"
    nifti.write(path, np.zeros((4, 5, 6), dtype=np.int16), m)
    out = subprocess.run([str(cli_path()), "info", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    g = ijk_to_ras_to_lps_geometry(m)
    assert info["dims"] == [6, 5, 4]  # ITK order (i, j, k) of a [k, j, i] array
    # NIfTI keeps the matrix in float32.
    assert np.allclose(info["spacing"], g.spacing, atol=1e-5)
    assert np.allclose(info["origin"], g.origin, atol=1e-4)
    assert np.allclose(info["direction"], g.direction, atol=1e-5)
