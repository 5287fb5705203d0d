"""Cryo-EM physics and data: densities, rotations, projection, CTF, noise, FSC, MRC/STAR I/O.

Conventions (details in each module's docstring and in docs/cryoem.md):

* Volumes ``(D, D, D)`` indexed ``[z, y, x]`` (MRC order), images ``(D, D)`` indexed
  ``[y, x]``, D even. Index ``i`` sits at ``(i - D//2) * apix`` A: rotations act about
  voxel ``D//2``. Neural-field coordinates are ``(i - D//2) / D`` (:func:`field_coordinates`).
* A rotation ``R`` acts on column vectors ``(x, y, z)``; the projection (:func:`project`) is
  ``I[y, x] = sum_k V(R^T (x, y, z_k))`` (trilinear, zero outside the box).
  RELION Euler angles give ``R`` directly (:func:`relion_euler_to_matrix`).
* Fourier arrays are centred: index ``i`` is frequency ``(i - D//2) / (D apix)`` 1/A.
* Units: A, kV, mm (Cs), degrees (angles in files and CTF arguments), A^2 (B-factors);
  axis-angle and geodesic distances in radians unless the name ends in ``_deg``.

Importing this package loads only torch and numpy; gemmi, mrcfile, starfile and tqdm are
imported inside the functions that use them.
"""

from fieldkern.cryoem.alignment import AlignmentResult, align_volume
from fieldkern.cryoem.ctf import apply_ctf, ctf, ctf_frequencies, electron_wavelength, evaluate_ctf
from fieldkern.cryoem.density import STRUCTURES, density_from_structure, load_atoms, structure_path
from fieldkern.cryoem.fourier import (
    fft2_centered,
    fft3_centered,
    fftn_centered,
    fourier_crop,
    fourier_shift,
    ifft2_centered,
    ifft3_centered,
    ifftn_centered,
)
from fieldkern.cryoem.fsc import fourier_shell_correlation, resolution, shell_indices
from fieldkern.cryoem.io import (
    CTFParams,
    ImageStack,
    ParticleDataset,
    load_particles,
    read_mrc,
    write_mrc,
    write_particles_star,
)
from fieldkern.cryoem.noise import add_noise, noise_sigma
from fieldkern.cryoem.projection import field_coordinates, project, transform_volume
from fieldkern.cryoem.rotations import (
    angular_distance,
    angular_distance_deg,
    axis_angle_to_matrix,
    canonicalize_axis_angle,
    clamp_axis_angle,
    clamp_axis_angle_,
    is_rotation,
    jitter_rotations,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    matrix_to_relion_euler,
    perturb_rotations,
    projection_direction,
    quaternion_to_matrix,
    random_rotations,
    relion_euler_to_matrix,
    rodrigues,
    super_fibonacci_rotations,
)
from fieldkern.cryoem.simulate import PAPER_SETTINGS, SimulationResult, simulate

__all__ = [
    "PAPER_SETTINGS",
    "STRUCTURES",
    "AlignmentResult",
    "CTFParams",
    "ImageStack",
    "ParticleDataset",
    "SimulationResult",
    "add_noise",
    "align_volume",
    "angular_distance",
    "angular_distance_deg",
    "apply_ctf",
    "axis_angle_to_matrix",
    "canonicalize_axis_angle",
    "clamp_axis_angle",
    "clamp_axis_angle_",
    "ctf",
    "ctf_frequencies",
    "density_from_structure",
    "electron_wavelength",
    "evaluate_ctf",
    "fft2_centered",
    "fft3_centered",
    "fftn_centered",
    "field_coordinates",
    "fourier_crop",
    "fourier_shell_correlation",
    "fourier_shift",
    "ifft2_centered",
    "ifft3_centered",
    "ifftn_centered",
    "is_rotation",
    "jitter_rotations",
    "load_atoms",
    "load_particles",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_relion_euler",
    "noise_sigma",
    "perturb_rotations",
    "project",
    "projection_direction",
    "quaternion_to_matrix",
    "random_rotations",
    "read_mrc",
    "relion_euler_to_matrix",
    "resolution",
    "rodrigues",
    "shell_indices",
    "simulate",
    "structure_path",
    "super_fibonacci_rotations",
    "transform_volume",
    "write_mrc",
    "write_particles_star",
]
