"""Bad input to the cryo-EM layer: corrupt files, NaN values, unit mistakes, empty batches
and wrong shapes raise errors that name the argument (and the file), not library errors
or plausible-looking results."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import fieldkern.cryoem as cem
from fieldkern.cryoem.data import prepare_data
from fieldkern.cryoem.presets import cryoem_preset
from fieldkern.ops.project_volume import project_volume_reference

mrcfile = pytest.importorskip("mrcfile")
starfile = pytest.importorskip("starfile")

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")


def _blob(D=8, dtype=torch.float32):
    g = torch.arange(D, dtype=dtype) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    return torch.exp(-((x - 1) ** 2 + y**2 + (z + 1) ** 2) / 4)


def _particle_set(tmp_path, n=4, d=8, **optics):
    """A stack and a RELION 3.1 STAR file for it; ``optics`` overrides data_optics columns."""
    cem.write_mrc(tmp_path / "s.mrcs", np.random.default_rng(0).standard_normal((n, d, d)).astype(np.float32), 2.0)
    star = cem.write_particles_star(
        tmp_path / "p.star", image_names=[f"{i + 1:06d}@s.mrcs" for i in range(n)],
        euler_deg=torch.zeros(n, 3), dfu=torch.full((n,), 1e4), dfv=torch.full((n,), 1e4),
        dfang=torch.zeros(n), apix=2.0, box=d,
    )
    if optics:
        blocks = starfile.read(star, always_dict=True)
        for k, v in optics.items():
            blocks["optics" if k in blocks["optics"].columns else "particles"][k] = v
        starfile.write(blocks, star)
    return star


def _raw_mrc(path, data, apix):
    """Write with mrcfile directly: write_mrc refuses NaN data and a zero voxel size."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = apix
    return path


# --------------------------------------------------------------------------- example: maps


def _example():
    spec = importlib.util.spec_from_file_location("cryoem_example", ROOT / "examples" / "cryoem.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_map_structure_box_and_apix_come_from_the_header(tmp_path, capsys):
    path = cem.write_mrc(tmp_path / "emd_1.MAP", _blob(), 6.0)
    parse = _example().parse_args
    for extra in (["--box", "16", "--apix", "1.0"], ["--apix", "2"]):
        with pytest.raises(SystemExit) as info:
            parse(["--structure", str(path), *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "come from the map's header" in err and "box 8, 6 A/pixel" in err and str(path) in err
    # The header's own values, or none, are fine.
    assert parse(["--structure", str(path), "--box", "8", "--apix", "6.0"]).box == 8
    assert parse(["--structure", str(path)]).apix is None
    _raw_mrc(tmp_path / "noapix.mrc", _blob(), 0.0)
    with pytest.raises(SystemExit) as info:
        parse(["--structure", str(tmp_path / "noapix.mrc"), "--apix", "2"])
    assert info.value.code == 2
    assert "header has no voxel size" in capsys.readouterr().err


def test_example_refuses_simulation_settings_with_particles(capsys):
    with pytest.raises(SystemExit) as info:
        _example().parse_args(["--particles", "p.star", "--box", "32", "--snr", "0.1"])
    assert info.value.code == 2
    assert "--box, --snr: simulation settings, which do not apply to --particles" in capsys.readouterr().err


def test_example_pose_search_option(capsys):
    assert _example().parse_args(["--pose-search", "4608"]).pose_search == 4608
    assert cryoem_preset("quick", pose_search=4608).recon.pose_search == 4608
    with pytest.raises(SystemExit) as info:
        _example().parse_args(["--pose-search", "-1"])
    assert info.value.code == 2 and "--pose-search must be >= 0" in capsys.readouterr().err


def test_example_cuda_graphs_option(capsys):
    assert _example().parse_args(["--cuda-graphs", "--device", "cuda:1"]).cuda_graphs
    assert not _example().parse_args(["--device", "cpu"]).cuda_graphs
    with pytest.raises(SystemExit) as info:
        _example().parse_args(["--cuda-graphs", "--device", "cpu"])
    assert info.value.code == 2 and "--cuda-graphs replays CUDA graphs: it needs a CUDA --device" in capsys.readouterr().err


def test_prepare_data_reads_map_files_and_checks_them(tmp_path):
    preset = cryoem_preset("tiny", n_particles=3)
    path = cem.write_mrc(tmp_path / "emd_1.map", _blob(), 6.0)  # EMDB's ending went to gemmi
    data = prepare_data(str(path), tmp_path / "out", preset, 0, progress=False)
    assert data.dataset.box == 8 and data.dataset.apix == 6.0 and len(data.dataset) == 3
    _raw_mrc(tmp_path / "noapix.mrc", _blob(), 0.0)
    with pytest.raises(ValueError, match=r"noapix\.mrc.*header has no voxel size"):
        prepare_data(str(tmp_path / "noapix.mrc"), tmp_path / "o2", preset, 0, progress=False)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_reference_map_with_nan_fails_instead_of_reporting_n_a(tmp_path):
    star = _particle_set(tmp_path)
    ref = _blob()
    ref[2, 3, 4] = NAN
    _raw_mrc(tmp_path / "ref.mrc", ref.numpy(), 2.0)
    preset = cryoem_preset("tiny")
    with pytest.raises(ValueError, match=r"ref\.mrc holds NaN"):
        prepare_data("4ake", tmp_path, preset, 0, particles=str(star), reference=str(tmp_path / "ref.mrc"),
                     progress=False)


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_reference_or_structure_map_is_refused(tmp_path, value):
    """An all-zero --reference was accepted: resolution n/a and maps "aligned" to it by 178.7
    degrees written as results."""
    star = _particle_set(tmp_path)
    _raw_mrc(tmp_path / "ref.mrc", np.full((8, 8, 8), value, np.float32), 2.0)
    preset = cryoem_preset("tiny")
    with pytest.raises(ValueError, match=r"ref\.mrc holds one value everywhere.*no structure"):
        prepare_data("4ake", tmp_path, preset, 0, particles=str(star), reference=str(tmp_path / "ref.mrc"),
                     progress=False)
    with pytest.raises(ValueError, match=r"map .*ref\.mrc holds one value everywhere"):
        prepare_data(str(tmp_path / "ref.mrc"), tmp_path / "o", preset, 0, progress=False)


# --------------------------------------------------------------------------- corrupt files


def test_truncated_or_garbage_mrc_names_the_file(tmp_path):
    good = cem.write_mrc(tmp_path / "good.mrc", _blob(), 2.0).read_bytes()
    (tmp_path / "cut.mrc").write_bytes(good[:-100])
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file" * 100)
    for name in ("cut.mrc", "junk.mrc"):
        with pytest.raises(ValueError, match=name) as info:
            cem.read_mrc(tmp_path / name)
        assert isinstance(info.value.__cause__, ValueError)  # mrcfile's own error, chained


def test_truncated_particle_stack_names_the_stack(tmp_path):
    star = _particle_set(tmp_path)
    stack = tmp_path / "s.mrcs"
    stack.write_bytes(stack.read_bytes()[:-100])
    for lazy in (False, True):
        with pytest.raises(ValueError, match=r"s\.mrcs could not be read.*truncated") as info:
            cem.load_particles(star, lazy=lazy)
        assert info.value.__cause__ is not None


def test_star_values_that_are_not_numbers_name_file_and_column(tmp_path):
    star = _particle_set(tmp_path, rlnDefocusV=["15000", "abc", "15000", "15000"])
    with pytest.raises(ValueError, match=r"p\.star: column rlnDefocusV .*not a number.*abc") as info:
        cem.load_particles(star)
    assert info.value.__cause__ is not None
    star = _particle_set(tmp_path, rlnVoltage=["kV300"])
    with pytest.raises(ValueError, match=r"p\.star: column rlnVoltage of data_optics"):
        cem.load_particles(star)


def test_star_row_cut_short_is_reported_as_such(tmp_path):
    star = _particle_set(tmp_path)
    lines = star.read_text().rstrip("\n").split("\n")
    lines[-1] = " ".join(lines[-1].split()[:3])  # the last row keeps its first three fields
    star.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"p\.star: .* holds NaN or inf values \(or empty fields"):
        cem.load_particles(star)


def test_bad_structure_files_name_the_file(tmp_path):
    pytest.importorskip("gemmi")
    short = tmp_path / "short.pdb"
    short.write_text("ATOM      1  CA  ALA A   1       0.000   0.0\nEND\n")
    with pytest.raises(ValueError, match=r"short\.pdb: could not be read as a PDB/mmCIF") as info:
        cem.load_atoms(short)
    assert isinstance(info.value.__cause__, RuntimeError)
    junk = tmp_path / "junk.pdb"
    junk.write_text("lorem ipsum\n")
    with pytest.raises(ValueError, match=r"junk\.pdb: could not be read as a structure"):
        cem.load_atoms(junk)
    waters = tmp_path / "waters.pdb"
    waters.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    with pytest.raises(ValueError, match="after filtering"):  # here the filters did drop everything
        cem.load_atoms(waters)


# --------------------------------------------------------------------------- NaN and units


def test_resolution_of_a_nan_curve_raises():
    with pytest.raises(ValueError, match="fsc holds NaN"):
        cem.resolution(torch.full((8,), NAN, dtype=torch.float64), apix=1.5)
    f = torch.tensor([1.0, 0.9, NAN, 0.2], dtype=torch.float64)
    with pytest.raises(ValueError, match="fsc"):
        cem.resolution(f, apix=1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(volt=300000.0), "volt must be the acceleration voltage in kV"),
        (dict(dfu=1.5, dfv=1.5), "dfu must be in Angstrom"),
        (dict(dfv=torch.tensor([15000.0, -2.0])), "dfv must be in Angstrom"),
        (dict(cs=NAN), "cs holds NaN"),
        (dict(bfactor=float("inf")), "bfactor holds NaN"),
        (dict(dfang=torch.tensor([0.0, NAN])), "dfang holds NaN"),
    ],
)
def test_ctf_rejects_nan_and_wrong_units(kwargs, match):
    args = dict(dfu=15000.0, dfv=15000.0, dfang=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cem.ctf(8, 1.0, **args)
    kx, ky = cem.ctf_frequencies(8, 1.0)
    with pytest.raises(ValueError, match=match):
        cem.evaluate_ctf(kx, ky, **args)


def test_ctf_still_takes_zero_defocus_and_normal_values():
    assert torch.isfinite(cem.ctf(8, 1.0, 0.0, 0.0, 0.0)).all()  # in focus (phase plate data)
    assert cem.ctf(8, 1.0, torch.tensor([-15000.0, 2e4]), 19000.0, 10.0, volt=200.0).shape == (2, 8, 8)


@pytest.mark.parametrize(
    "column, value, match",
    [
        ("rlnVoltage", -300.0, "rlnVoltage must be a positive voltage in kV"),
        ("rlnVoltage", 300000.0, "rlnVoltage must be the acceleration voltage in kV"),
        ("rlnAmplitudeContrast", 10.0, r"rlnAmplitudeContrast \(amplitude contrast\) must lie in \[0, 1\]"),
        ("rlnDefocusU", 1.5, "rlnDefocusU must be in Angstrom"),
    ],
)
def test_load_particles_checks_optics_values_naming_the_file(tmp_path, column, value, match):
    star = _particle_set(tmp_path, **{column: value})
    with pytest.raises(ValueError, match=rf"p\.star: {match}"):
        cem.load_particles(star)


def test_density_rejects_non_finite_bfactor_and_center(tmp_path):
    pytest.importorskip("gemmi")
    pdb = tmp_path / "c.pdb"
    pdb.write_text("ATOM      1  C   ALA A   1       0.000   0.000   0.000  1.00  0.00           C\nEND\n")
    with pytest.raises(ValueError, match="bfactor must be a finite number"):
        cem.density_from_structure(pdb, 8, 1.0, bfactor=NAN)
    with pytest.raises(ValueError, match="center holds NaN"):
        cem.density_from_structure(pdb, 8, 1.0, center=[NAN, 0.0, 0.0])


def test_simulate_rejects_a_nan_volume_and_takes_numpy_counts(tmp_path):
    v = _blob()
    v[1, 2, 3] = NAN
    with pytest.raises(ValueError, match="structure holds NaN"):
        cem.simulate(v, tmp_path / "a", n_particles=2, apix=2.0, progress=False)
    assert not (tmp_path / "a" / "particles.mrcs").exists()
    res = cem.simulate(_blob(), tmp_path / "b", n_particles=np.int64(2), apix=2.0, snr=None,
                       batch_size=np.int32(1), progress=False)
    assert res.n_particles == 2 and type(res.n_particles) is int


def test_simulate_checks_ctf_units_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="defocus_range must be in Angstrom"):
        cem.simulate(_blob(), tmp_path / "c", n_particles=2, apix=2.0, defocus_range=(1.5, 2.0), progress=False)
    with pytest.raises(ValueError, match="volt must be the acceleration voltage in kV"):
        cem.simulate(_blob(), tmp_path / "d", n_particles=2, apix=2.0, volt=300e3, progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


# --------------------------------------------------------------------------- Fourier paths


def test_fourier_projection_of_no_rotations_and_ctf_of_no_images():
    V = _blob()
    out = cem.project(V, torch.zeros(0, 3, 3), method="fourier")
    assert out.shape == (0, 8, 8) and out.dtype == V.dtype
    assert cem.apply_ctf(torch.zeros(0, 8, 8), torch.ones(0, 16, 16)).shape == (0, 8, 8)
    assert cem.apply_ctf(torch.zeros(0, 8, 8), torch.ones(16, 16)).shape == (0, 8, 8)


@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_fourier_projection_of_a_non_finite_rotation_is_nan(bad):
    """Not the plausible empty image grid_sample would give; the other images unchanged."""
    from fieldkern.cryoem.fourier_slice import central_slices, volume_spectrum

    v = _blob()
    R = cem.random_rotations(3, generator=torch.Generator().manual_seed(0))
    good = cem.project(v, R, method="fourier")
    good_slices = central_slices(volume_spectrum(v), R, v.shape[0])
    R[1, 0, 1] = bad
    out = cem.project(v, R, method="fourier")
    slices = central_slices(volume_spectrum(v), R, v.shape[0])
    assert out[1].isnan().all() and slices[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]], good[[0, 2]])
    torch.testing.assert_close(slices[[0, 2]], good_slices[[0, 2]])


def test_apply_ctf_batch_mismatch_names_ctf():
    with pytest.raises(ValueError, match=r"ctf's batch shape \(3,\) must broadcast against the images' \(2,\)"):
        cem.apply_ctf(torch.zeros(2, 8, 8), torch.ones(3, 16, 16))


@pytest.mark.parametrize("oversampling, exc", [(0, ValueError), (-1, ValueError), (1.1, ValueError),
                                               (NAN, ValueError), (True, TypeError), ("2", TypeError)])
def test_oversampling_is_checked(oversampling, exc):
    R = cem.random_rotations(2, torch.Generator().manual_seed(0))
    with pytest.raises(exc, match="oversampling must be a number >= 1"):
        cem.project(_blob(), R, method="fourier", oversampling=oversampling)


def test_oversampling_making_an_even_padded_size_is_accepted():
    R = cem.random_rotations(2, torch.Generator().manual_seed(0))
    V = _blob()
    a = cem.project(V, R, method="fourier", oversampling=1.5)  # padded size 12
    b = cem.project(V, R, method="fourier", oversampling=np.int64(2))
    assert a.shape == b.shape == (2, 8, 8)
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_projection_of_half_volumes_returns_their_dtype(dtype):
    R = cem.random_rotations(2, torch.Generator().manual_seed(0))
    V = _blob()
    out = cem.project(V.to(dtype), R, method="fourier")
    assert out.dtype == dtype
    ref = cem.project(V, R, method="fourier")
    # The volume and the images rounded to dtype (half an ulp each): measured 3.3e-4 (float16)
    # and 3.0e-3 (bfloat16) of the images' max, against eps 9.8e-4 and 7.8e-3.
    assert (out.float() - ref).abs().max() < torch.finfo(dtype).eps * ref.abs().max()


def test_fourier_crop_and_fftn_check_their_axes():
    with pytest.raises(ValueError, match="equal, even trailing axes"):
        cem.fourier_crop(torch.rand(8, 8, 6), 4, 3)
    with pytest.raises(ValueError, match="equal, even trailing axes"):
        cem.fourier_crop(torch.rand(9, 9, 9), 4, 3)
    with pytest.raises(ValueError, match=r"ndim = 3 needs a tensor with at least 3 axes"):
        cem.fourier_crop(torch.rand(8, 8), 4, 3)
    assert cem.fourier_crop(torch.rand(5, 8, 8), 4, 2).shape == (5, 4, 4)  # batch axes are free
    with pytest.raises(ValueError, match="ndim must be a positive int"):
        cem.fftn_centered(torch.rand(4, 4), 0)
    with pytest.raises(ValueError, match="ndim = 5"):
        cem.ifftn_centered(torch.rand(4, 4), 5)


# --------------------------------------------------------------------------- counts, shapes, leftovers


def test_counts_accept_numpy_integers_but_not_bools():
    assert cem.random_rotations(np.int64(3)).shape == (3, 3, 3)
    assert cem.super_fibonacci_rotations(np.int32(4)).shape == (4, 3, 3)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        cem.random_rotations(True)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        cem.random_rotations(3.0)


def test_transform_volume_shift_shape():
    V = _blob()
    with pytest.raises(ValueError, match=r"shift must have shape \(3,\), .*got \(2,\)"):
        cem.transform_volume(V, torch.eye(3), torch.zeros(2))
    R = cem.random_rotations(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"shift must have shape \(3,\) or \(3, 3\)"):
        cem.transform_volume(V, R, torch.zeros(2, 3))
    # One shift per matrix, or one for all: each volume as its own single call gives it
    # (measured: identical; the batched path multiplies in another routine).
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.5, 0.5], [0.3, 0.2, -0.7]])
    per_matrix = cem.transform_volume(V, R, t)
    assert per_matrix.shape == (3, 8, 8, 8)
    for i in range(3):
        torch.testing.assert_close(per_matrix[i], cem.transform_volume(V, R[i], t[i]), rtol=0, atol=1e-6)
    shared = cem.transform_volume(V, R, t[1])
    assert shared.shape == (3, 8, 8, 8)
    for i in range(3):
        torch.testing.assert_close(shared[i], cem.transform_volume(V, R[i], t[1]), rtol=0, atol=1e-6)


def _star_args(**kw):
    args = dict(image_names=["000001@a.mrcs", "000002@a.mrcs"], euler_deg=np.zeros((2, 3)), dfu=[1e4] * 2,
                dfv=[1e4] * 2, dfang=[0.0] * 2, apix=1.0, box=8)
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(apix=0.0), ValueError, "apix must be a positive"),
        (dict(box=7.5), ValueError, "box must be a positive int"),
        (dict(euler_deg=np.full((2, 3), NAN)), ValueError, "euler_deg holds NaN"),
        (dict(dfu=[1e4] * 3), ValueError, r"dfu must have shape \(2,\)"),
        (dict(image_names="000001@a.mrcs"), TypeError, "image_names must be a sequence of str"),
        (dict(image_names=[1, 2]), TypeError, "image_names must hold str"),
        (dict(extra_columns={"rlnClassNumber": [1, 2, 3]}), ValueError, r"extra_columns\['rlnClassNumber'\]"),
    ],
)
def test_write_particles_star_checks_its_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cem.write_particles_star(tmp_path / "o.star", **_star_args(**kwargs))
    assert not (tmp_path / "o.star").exists()


def test_write_particles_star_takes_numpy_box_and_scalars(tmp_path):
    star = cem.write_particles_star(tmp_path / "o.star", **_star_args(box=np.int64(8), dfang=0.0))
    assert starfile.read(star, always_dict=True)["optics"]["rlnImageSize"][0] == 8


def test_align_volume_checks_counts_and_nan():
    V = _blob()
    with pytest.raises(ValueError, match="n_candidates must be a positive int"):
        cem.align_volume(V, V, n_candidates=0)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        cem.align_volume(V, V, chunk=0)
    bad = V.clone()
    bad[0, 0, 0] = NAN
    with pytest.raises(ValueError, match="reference holds NaN"):
        cem.align_volume(V, bad)


def test_shell_indices_of_zero():
    with pytest.raises(ValueError, match="D must be a positive int"):
        cem.shell_indices(0)


def test_write_mrc_bfloat16_and_nan(tmp_path):
    v = _blob()
    back, _ = cem.read_mrc(cem.write_mrc(tmp_path / "b.mrc", v.bfloat16(), 2.0))
    assert back.dtype == torch.float32 and torch.equal(back, v.bfloat16().float())
    v[0, 1, 2] = NAN
    with pytest.raises(ValueError, match=r"n\.mrc: data holds NaN"):
        cem.write_mrc(tmp_path / "n.mrc", v, 2.0)
    assert not (tmp_path / "n.mrc").exists()


def test_angular_distance_rejects_matrices_that_are_not_rotations():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="R2 must hold rotation matrices"):
        cem.angular_distance_deg(eye, 2 * eye)
    with pytest.raises(ValueError, match="R1 must hold rotation matrices"):
        cem.angular_distance_deg(torch.zeros(3, 3), eye)
    with pytest.raises(ValueError, match=r"index \[1\]"):
        cem.angular_distance(torch.stack([eye, torch.diag(torch.tensor([1.0, 1.0, -1.0]))]), eye)
    R = cem.random_rotations(4, torch.Generator().manual_seed(0))
    assert torch.allclose(cem.angular_distance_deg(R, R), torch.zeros(4), atol=1e-3)


NOT_ROTATIONS = {
    "2I": 2 * torch.eye(3),
    "reflection": torch.diag(torch.tensor([1.0, 1.0, -1.0])),
    "zero": torch.zeros(3, 3),
    "shear": torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
}


@pytest.mark.parametrize("name", list(NOT_ROTATIONS))
def test_matrices_that_are_not_rotations_are_refused_where_they_enter(name):
    """2I gave plausible images (and the real and Fourier projectors disagreed: maxima 5.66
    vs 3.16); the conversions returned angles for non-rotations."""
    v = _blob()
    R = cem.random_rotations(3, generator=torch.Generator().manual_seed(0))
    R[1] = NOT_ROTATIONS[name]
    for method in ("real", "fourier"):
        with pytest.raises(ValueError, match=r"rotations must be rotation matrices.*matrix 1 is not"):
            cem.project(v, R, method=method)
    with pytest.raises(ValueError, match="rotation matrices"):
        project_volume_reference(v, R)
    for convert in (cem.matrix_to_relion_euler, cem.matrix_to_axis_angle, cem.matrix_to_quaternion):
        with pytest.raises(ValueError, match="R must be rotation matrices"):
            convert(R)
    R[1] = torch.eye(3) + 2e-4  # within the stated tolerance (float32 rounding, drift)
    cem.project(v, R)
    cem.matrix_to_relion_euler(R)


def test_transform_volume_takes_reflections_but_not_scalings():
    v = _blob()
    flipped = cem.transform_volume(v, NOT_ROTATIONS["reflection"])  # z -> -z about voxel D//2
    torch.testing.assert_close(flipped[1:], v.flip(0)[:-1])
    with pytest.raises(ValueError, match="matrix must be orthogonal matrices"):
        cem.transform_volume(v, NOT_ROTATIONS["2I"])
