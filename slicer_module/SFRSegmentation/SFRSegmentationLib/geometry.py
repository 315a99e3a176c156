"""Geometry conversion between 3D Slicer and libsfr.

Slicer describes a volume by its IJK-to-RAS 4x4 matrix and hands out voxels as numpy arrays
indexed ``[k, j, i]`` (``slicer.util.arrayFromVolume``: i fastest in memory). libsfr, like ITK,
takes an LPS geometry: ``origin[3]``, ``spacing[3]`` and a row-major 3x3 ``direction`` whose
column ``c`` is the unit direction of axis ``c``; dims are ``(i, j, k)``.

With ``F = diag(-1, -1, 1)`` (RAS <-> LPS) and the IJK-to-RAS matrix ``[A | t]``:

    LPS(p) = F (A p + t) = origin + D diag(spacing) p

so ``spacing = column norms of A`` (F keeps norms), ``D = F A diag(1/spacing)`` and
``origin = F t``. Nothing assumes the matrix is diagonal: oblique and left-handed matrices
convert exactly both ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class LpsGeometry:
    """ITK/libsfr geometry: LPS origin (mm), spacing (mm), direction (row-major 3x3 as 9 floats,
    column c = direction of axis c)."""

    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def is_close(self, other: "LpsGeometry", rtol: float = 1e-5, atol: float = 1e-4) -> bool:
        """Same grid up to rounding (Slicer stores matrices as doubles, NIfTI as floats)."""
        return (
            np.allclose(self.origin, other.origin, rtol=rtol, atol=atol)
            and np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=rtol, atol=atol)
        )


def _as_matrix(m4) -> np.ndarray:
    m = np.asarray(m4, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"an IJK-to-RAS matrix must be 4x4, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("the IJK-to-RAS matrix contains NaN or infinite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"the IJK-to-RAS matrix's last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    return m


def ijk_to_ras_to_lps_geometry(m4) -> LpsGeometry:
    """Slicer IJK-to-RAS 4x4 matrix (numpy array or nested lists) -> libsfr LPS geometry."""
    m = _as_matrix(m4)
    a = m[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0.0):
        raise ValueError(f"the IJK-to-RAS matrix has a zero column (spacing {spacing.tolist()}): not a volume geometry")
    if abs(np.linalg.det(a)) < 1e-12 * float(np.prod(spacing)):
        raise ValueError("the IJK-to-RAS matrix is singular (axes are parallel): not a volume geometry")
    direction = _RAS_LPS @ a / spacing[np.newaxis, :]
    origin = _RAS_LPS @ m[:3, 3]
    return LpsGeometry(
        origin=tuple(float(x) for x in origin),
        spacing=tuple(float(x) for x in spacing),
        direction=tuple(float(x) for x in direction.reshape(9)),
    )


def lps_geometry_to_ijk_to_ras(geometry: LpsGeometry) -> np.ndarray:
    """libsfr LPS geometry -> Slicer IJK-to-RAS 4x4 matrix (the inverse of the above)."""
    d = geometry.direction_matrix()
    s = np.asarray(geometry.spacing, dtype=float)
    m = np.eye(4)
    m[:3, :3] = _RAS_LPS @ d * s[np.newaxis, :]
    m[:3, 3] = _RAS_LPS @ np.asarray(geometry.origin, dtype=float)
    return m


def itk_dims(shape: Sequence[int]) -> Tuple[int, int, int]:
    """numpy ``[k, j, i]`` shape -> ITK size ``(i, j, k)``."""
    if len(shape) != 3:
        raise ValueError(f"expected a 3D array [k, j, i], got {len(shape)} dimensions (shape {tuple(shape)})")
    return (int(shape[2]), int(shape[1]), int(shape[0]))
