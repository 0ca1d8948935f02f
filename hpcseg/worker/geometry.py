"""Between Slicer's volumes (a numpy array and an IJK-to-RAS matrix) and SimpleITK images (LPS), and RAS points
to the voxel indices hpcseg's server wants.

Slicer keeps a volume as ``arrayFromVolume`` (numpy, axes k, j, i) plus a 4×4 IJK-to-RAS matrix, and its markups
give points in RAS (+x toward the patient's Right, +y Anterior, +z Superior). ITK and SimpleITK, like DICOM, use
LPS (+x Left, +y Posterior, +z Superior): the same physical point with its first two coordinates negated. So for
a voxel index (i, j, k)::

    RAS = M @ [i, j, k, 1]                  M = IJK-to-RAS (Slicer)
    LPS = diag(-1, -1, 1) @ RAS[:3]         = origin_LPS + direction_LPS @ (spacing * [i, j, k])

The numpy array of ``sitk.GetArrayFromImage`` is in (z, y, x) = (k, j, i) order, the same as Slicer's, so voxels
move without any transposition. hpcseg's server takes voxel indices ``[x, y, z]`` = ``[i, j, k]``.

Example::

    image = image_from_array(array, ijk_to_ras)                 # for hpcseg (LPS geometry)
    array, ijk_to_ras = array_from_image(mask)                  # back for Slicer
    clicks = voxel_indices(points_ras, ijk_to_ras, array.shape) # [[i, j, k], ...] for the server
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: RAS <-> LPS: negate the first two axes (the matrix is its own inverse)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _matrix(ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"an IJK-to-RAS matrix is 4×4, got shape {m.shape}")
    return m


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """Slicer's IJK-to-RAS matrix of a SimpleITK image (LPS geometry)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin(), dtype=float)
    return m


def geometry_from_matrix(ijk_to_ras: Sequence[Sequence[float]] | np.ndarray
                         ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(spacing, origin, direction)`` in ITK's LPS convention from Slicer's IJK-to-RAS matrix."""
    m = _matrix(ijk_to_ras)
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the IJK-to-RAS matrix has a zero column: not a volume's geometry")
    direction = RAS_TO_LPS @ (columns / spacing)
    origin = RAS_TO_LPS @ m[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def image_from_array(array: np.ndarray, ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> sitk.Image:
    """A SimpleITK image from a (k, j, i) array and its IJK-to-RAS matrix (the voxels are copied)."""
    if array.ndim != 3:
        raise ValueError(f"a volume array has 3 axes (k, j, i), got shape {array.shape}")
    spacing, origin, direction = geometry_from_matrix(ijk_to_ras)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def array_from_image(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(array (k, j, i), IJK-to-RAS matrix)`` of a SimpleITK image, ready for ``updateVolumeFromArray``."""
    return sitk.GetArrayFromImage(image), ijk_to_ras_matrix(image)


def ras_to_ijk(points_ras: Sequence[Sequence[float]] | np.ndarray,
               ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Continuous voxel coordinates ``(n, 3)`` [i, j, k] of RAS points."""
    pts = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    homogeneous = np.c_[pts, np.ones(len(pts))]
    return (np.linalg.inv(_matrix(ijk_to_ras)) @ homogeneous.T).T[:, :3]


def ijk_to_ras(points_ijk: Sequence[Sequence[float]] | np.ndarray,
               ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """RAS coordinates ``(n, 3)`` of voxel coordinates [i, j, k]."""
    pts = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
    return (_matrix(ijk_to_ras) @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]


def voxel_indices(points_ras: Sequence[Sequence[float]] | np.ndarray,
                  ijk_to_ras: Sequence[Sequence[float]] | np.ndarray, shape_kji: Sequence[int]) -> list[list[int]]:
    """The voxels ``[[i, j, k], ...]`` that hold RAS points; ValueError naming a point outside the volume."""
    size = np.array(list(reversed(shape_kji[:3])))  # (i, j, k) extents
    out = []
    for ras, ijk in zip(np.asarray(points_ras, dtype=float).reshape(-1, 3), ras_to_ijk(points_ras, ijk_to_ras),
                        strict=True):
        idx = np.rint(ijk).astype(int)
        if np.any(idx < 0) or np.any(idx >= size):
            raise ValueError(f"point R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f} is outside the volume "
                             f"(voxel {idx.tolist()}, size {size.tolist()})")
        out.append([int(v) for v in idx])
    return out


@dataclass
class VolumeArray:
    """A Slicer volume as plain data: voxels (k, j, i), IJK-to-RAS matrix, and a key that changes with them.

    ``key`` (e.g. the node id and the image data's modification time) lets a session tell "same image" without
    hashing the voxels; with no key the voxels are hashed.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    key: str = ""

    def __post_init__(self) -> None:
        self.ijk_to_ras = _matrix(self.ijk_to_ras)
        if self.array.ndim != 3:
            raise ValueError(f"a volume array has 3 axes (k, j, i), got shape {self.array.shape}")

    @classmethod
    def from_image(cls, image: sitk.Image, key: str = "") -> VolumeArray:
        array, matrix = array_from_image(image)
        return cls(array, matrix, key)

    def to_image(self) -> sitk.Image:
        return image_from_array(self.array, self.ijk_to_ras)

    def fingerprint(self) -> str:
        """``key``, or a hash of the voxels and the matrix."""
        if self.key:
            return self.key
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(str((self.array.shape, self.array.dtype.str)).encode())
        h.update(np.ascontiguousarray(self.array).data)
        h.update(self.ijk_to_ras.tobytes())
        return h.hexdigest()

    def voxel_indices(self, points_ras: Sequence[Sequence[float]] | np.ndarray) -> list[list[int]]:
        return voxel_indices(points_ras, self.ijk_to_ras, self.array.shape)
