"""Rotations: conversions between representations, distances, sampling and perturbations.

* :mod:`~fieldkern.cryoem.rotations.conversions`: matrices, quaternions, axis-angle
  (exponential/logarithm maps, Rodrigues), RELION Euler angles, viewing direction.
* :mod:`~fieldkern.cryoem.rotations.distances`: geodesic angle, rotation test.
* :mod:`~fieldkern.cryoem.rotations.sampling`: uniform random rotations, super-Fibonacci grid.
* :mod:`~fieldkern.cryoem.rotations.perturbations`: ``R <- dR R`` (the paper's pose update,
  its axis-angle projection step, random jitter).

Conventions
-----------
* A rotation matrix ``R`` acts on column vectors ``(x, y, z)``; batches are ``(..., 3, 3)``.
* Projection convention of fieldkern (see :mod:`fieldkern.cryoem.projection`):
  ``I[y, x] = sum_k V(R^T (x, y, z_k))``, so ``R`` maps volume coordinates to image
  coordinates and the viewing direction in the volume frame is ``R^T e_z`` (third row of R).
* Quaternions are ``(w, x, y, z)`` with ``w >= 0``.
* Axis-angle: angle ``theta`` in radians about unit axis ``u``; a rotation vector is
  ``theta * u``.
* RELION Euler angles ``(rot, tilt, psi)`` in degrees (ZYZ): ``R`` equals RELION's
  ``Euler_angles2matrix(rot, tilt, psi)`` (the matrix ``A`` its projector uses: RELION's
  ``Projector::project`` samples the 3D transform at ``A^-1 (x, y, 0) = A^T (x, y, 0)``, which
  by the Fourier-slice theorem is our real-space ``I = sum_z V(A^T (x, y, z))``). So STAR
  angles map to our ``R`` directly, no transpose.
"""

from fieldkern.cryoem.rotations.conversions import (
    axis_angle_to_matrix,
    matmul3,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    matrix_to_relion_euler,
    projection_direction,
    quaternion_to_matrix,
    relion_euler_to_matrix,
    rodrigues,
)
from fieldkern.cryoem.rotations.distances import angular_distance, angular_distance_deg, is_rotation
from fieldkern.cryoem.rotations.perturbations import (
    canonicalize_axis_angle,
    clamp_axis_angle,
    clamp_axis_angle_,
    jitter_rotations,
    perturb_rotations,
)
from fieldkern.cryoem.rotations.sampling import random_rotations, super_fibonacci_rotations

__all__ = [
    "angular_distance",
    "angular_distance_deg",
    "axis_angle_to_matrix",
    "canonicalize_axis_angle",
    "clamp_axis_angle",
    "clamp_axis_angle_",
    "is_rotation",
    "jitter_rotations",
    "matmul3",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_relion_euler",
    "perturb_rotations",
    "projection_direction",
    "quaternion_to_matrix",
    "random_rotations",
    "relion_euler_to_matrix",
    "rodrigues",
    "super_fibonacci_rotations",
]
