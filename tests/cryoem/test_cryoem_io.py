"""simulate() -> MRC/STAR files -> load_particles() round trip, RELION conventions, and file errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fieldkern.cryoem as cem

# The cryoem extra (gemmi for the 1OL5 map the simulations use).
mrcfile = pytest.importorskip("mrcfile")
starfile = pytest.importorskip("starfile")
pytest.importorskip("gemmi")

D, APIX, N = 32, 3.0, 16


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    """Noise-free simulation (CTF applied), to compare images with the forward model."""
    out = tmp_path_factory.mktemp("clean")
    return cem.simulate("1ol5", out, n_particles=N, box=D, apix=APIX, snr=None, seed=7, progress=False)


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    return cem.simulate("1ol5", out, n_particles=N, box=D, apix=APIX, snr=0.1, seed=7, progress=False)


def test_files_and_headers(noisy_set):
    res = noisy_set
    assert res.star_path.name == "particles.star" and res.stack_path.name == "particles.mrcs"
    with mrcfile.open(res.stack_path) as m:
        assert m.is_image_stack() and m.data.shape == (N, D, D) and m.data.dtype == np.float32
        assert m.voxel_size.x == pytest.approx(APIX) and m.voxel_size.y == pytest.approx(APIX)
    gt, apix = cem.read_mrc(res.volume_path)
    assert apix == pytest.approx(APIX) and gt.shape == (D, D, D)
    assert torch.allclose(gt, cem.density_from_structure("1ol5", D, APIX))
    text = res.star_path.read_text()
    assert "data_optics" in text and "data_particles" in text and "# version 30001" in text
    meta = json.loads(res.metadata_path.read_text())
    assert meta["snr"] == 0.1 and meta["ctf_pad"] == 2


def test_star_round_trip_poses_and_ctf(noisy_set):
    res = noisy_set
    ds = cem.load_particles(res.star_path)
    assert len(ds) == N and ds.images.shape == (N, D, D) and ds.box == D and ds.apix == APIX
    assert float(cem.angular_distance_deg(ds.rotations, res.rotations).max()) < 1e-4
    assert torch.equal(ds.euler_deg, res.euler_deg)
    for k in ("dfu", "dfv", "dfang", "volt", "cs", "w", "phase_shift", "bfactor"):
        assert torch.equal(getattr(ds.ctf_params, k), getattr(res.ctf_params, k)), k
    assert torch.equal(ds.shifts_A, torch.zeros(N, 2, dtype=torch.float64))
    # The paper's CTF ranges.
    dfu, dfv = ds.ctf_params.dfu, ds.ctf_params.dfv
    assert ((dfu >= 15000) & (dfu <= 20000)).all()
    assert ((dfu - dfv >= 100) & (dfu - dfv <= 500)).all()
    assert ((ds.ctf_params.dfang >= 0) & (ds.ctf_params.dfang <= 360)).all()
    # starfile sees a proper RELION 3.1 file.
    blocks = starfile.read(res.star_path, always_dict=True)
    assert float(blocks["optics"]["rlnImagePixelSize"][0]) == APIX
    assert blocks["particles"]["rlnImageName"][0] == "000001@particles.mrcs"


def test_star_pose_gives_the_same_projection(clean_set):
    """Loaded poses + CTF reproduce the written images through the forward model."""
    ds = cem.load_particles(clean_set.star_path)
    gt, _ = cem.read_mrc(clean_set.volume_path)
    model = cem.apply_ctf(cem.project(gt, ds.rotations.float()), ds.ctf(size=2 * D))
    scale = float(ds.images.abs().max())
    assert torch.allclose(model, ds.images, atol=1e-5 * scale)
    # A wrong convention (transposed matrices) does not.
    wrong = cem.apply_ctf(cem.project(gt, ds.rotations.float().transpose(1, 2)), ds.ctf(size=2 * D))
    assert (wrong - ds.images).abs().max() > 0.1 * scale


def test_noise_level_and_determinism(clean_set, noisy_set, tmp_path):
    clean = cem.load_particles(clean_set.star_path).images.double()
    noisy = cem.load_particles(noisy_set.star_path).images.double()
    noise = noisy - clean  # same seed: same poses and CTFs, noise drawn last
    snr = float(clean.var(unbiased=False) / noise.var(unbiased=False))
    assert snr == pytest.approx(0.1, rel=0.05)
    assert noisy_set.noise_sigma == pytest.approx(float(noise.std()), rel=0.02)
    again = cem.simulate("1ol5", tmp_path, n_particles=N, box=D, apix=APIX, seed=7, progress=False)
    assert torch.equal(cem.load_particles(again.star_path).images, noisy.float())


def test_lazy_loading_and_invert(noisy_set):
    eager = cem.load_particles(noisy_set.star_path)
    lazy = cem.load_particles(noisy_set.star_path, lazy=True)
    assert isinstance(lazy.images, cem.ImageStack) and lazy.images.shape == (N, D, D)
    assert torch.equal(lazy.get_images([3, 1, 7]), eager.images[[3, 1, 7]])
    assert torch.equal(lazy.images[2], eager.images[2])
    assert torch.equal(lazy.images[4:9], eager.images[4:9])
    lazy.images.close()
    inv = cem.load_particles(noisy_set.star_path, invert=True)
    assert torch.equal(inv.images, -eager.images)


def test_simulate_from_a_volume_tensor(tmp_path, blob_volume):
    v = blob_volume(16).float()
    res = cem.simulate(v, tmp_path, n_particles=3, apix=2.0, progress=False)
    ds = cem.load_particles(res.star_path)
    assert ds.images.shape == (3, 16, 16) and ds.apix == 2.0
    with pytest.raises(FileExistsError, match="overwrite"):
        cem.simulate(v, tmp_path, n_particles=3, apix=2.0, progress=False)
    with pytest.raises(ValueError, match="apix"):
        cem.simulate(v, tmp_path / "x", n_particles=3, progress=False)
    with pytest.raises(ValueError, match="cubic"):
        cem.simulate(torch.zeros(16, 16, 14), tmp_path / "y", n_particles=3, apix=2.0, progress=False)
    with pytest.raises(ValueError, match="even"):
        cem.simulate(torch.zeros(15, 15, 15), tmp_path / "z", n_particles=3, apix=2.0, progress=False)
    with pytest.raises(ValueError, match="even"):
        cem.simulate("1ol5", tmp_path / "w", n_particles=3, box=33, apix=3.0, progress=False)


# --------------------------------------------------------------------------- hand-written RELION files


def _stack(path: Path, n=4, d=8, value=None, apix=1.0):
    data = np.random.default_rng(0).standard_normal((n, d, d)).astype(np.float32) if value is None else value
    cem.write_mrc(path, data, apix)
    return data


RELION31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
opticsGroup1 1 300.000000 2.700000 0.100000 1.250000 8 2
opticsGroup2 2 200.000000 2.000000 0.070000 1.250000 8 2

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnOpticsGroup #6
_rlnAngleRot #7
_rlnAngleTilt #8
_rlnAnglePsi #9
_rlnOriginXAngst #10
_rlnOriginYAngst #11
000002@Extract/job007/stack.mrcs mic1.mrc 15000.5 14800.25 33.3 1 10.0 20.0 30.0 1.25 -2.5
000004@Extract/job007/stack.mrcs mic1.mrc 16000.0 15900.0 -12.0 2 -45.0 90.0 180.0 0.0 0.0
"""


def test_reads_a_relion31_file(tmp_path):
    (tmp_path / "Extract" / "job007").mkdir(parents=True)
    data = _stack(tmp_path / "Extract" / "job007" / "stack.mrcs")
    star = tmp_path / "run_data.star"
    star.write_text(RELION31)
    ds = cem.load_particles(star)
    assert torch.equal(ds.images, torch.from_numpy(data[[1, 3]]))
    assert ds.apix == 1.25 and ds.box == 8
    assert torch.equal(ds.ctf_params.volt, torch.tensor([300.0, 200.0], dtype=torch.float64))
    assert torch.equal(ds.ctf_params.w, torch.tensor([0.1, 0.07], dtype=torch.float64))
    assert torch.equal(ds.ctf_params.dfv, torch.tensor([14800.25, 15900.0], dtype=torch.float64))
    assert torch.allclose(ds.shifts_A, torch.tensor([[1.25, -2.5], [0.0, 0.0]], dtype=torch.float64))
    expected = cem.relion_euler_to_matrix(
        torch.tensor([[10.0, 20.0, 30.0], [-45.0, 90.0, 180.0]], dtype=torch.float64)
    )
    assert torch.allclose(ds.rotations, expected)
    assert ds.ctf(size=16).shape == (2, 16, 16)


def test_reads_a_relion30_file_with_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    data = _stack(tmp_path / "data" / "p.mrcs", n=2)
    star = tmp_path / "meta" / "old.star"
    star.parent.mkdir()
    star.write_text(
        "data_\n\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n_rlnVoltage\n"
        "_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnDetectorPixelSize\n_rlnMagnification\n"
        "_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginX\n_rlnOriginY\n"
        "1@p.mrcs 10000 10000 0 300 2.7 0.1 5.0 25000 0 0 0 2.0 -1.0\n"
        "2@p.mrcs 11000 10000 0 300 2.7 0.1 5.0 25000 0 45 0 0.0 0.0\n"
    )
    with pytest.raises(FileNotFoundError, match="p.mrcs"):
        cem.load_particles(star)
    ds = cem.load_particles(star, data_dir=tmp_path / "data")
    assert ds.apix == pytest.approx(2.0)  # 5 um detector pixel / 25000x
    assert torch.equal(ds.images, torch.from_numpy(data))
    assert torch.allclose(ds.shifts_A, torch.tensor([[4.0, -2.0], [0.0, 0.0]], dtype=torch.float64))


def _write_sim_star(tmp_path, n=4, d=8, drop=(), optics_drop=(), **kw):
    names = [f"{i + 1:06d}@s.mrcs" for i in range(n)]
    star = cem.write_particles_star(
        tmp_path / "p.star",
        image_names=names,
        euler_deg=torch.zeros(n, 3),
        dfu=torch.full((n,), 1e4),
        dfv=torch.full((n,), 1e4),
        dfang=torch.zeros(n),
        apix=kw.pop("apix", 1.0),
        box=kw.pop("box", d),
    )
    if drop or optics_drop:
        blocks = starfile.read(star, always_dict=True)
        blocks["particles"] = blocks["particles"].drop(columns=list(drop))
        blocks["optics"] = blocks["optics"].drop(columns=list(optics_drop))
        starfile.write(blocks, star)
    return star


@pytest.mark.parametrize(
    "drop, optics_drop, match",
    [
        (("rlnDefocusV",), (), "missing required column.*rlnDefocusV"),
        (("rlnAngleTilt", "rlnAnglePsi"), (), "rlnAngleTilt, rlnAnglePsi"),
        (("rlnImageName",), (), "rlnImageName"),
        ((), ("rlnVoltage",), "rlnVoltage"),
        ((), ("rlnImagePixelSize", "rlnMicrographOriginalPixelSize"), "pixel size"),
    ],
)
def test_missing_columns_are_named(tmp_path, drop, optics_drop, match):
    _stack(tmp_path / "s.mrcs")
    star = _write_sim_star(tmp_path, drop=drop, optics_drop=optics_drop)
    with pytest.raises(ValueError, match=match):
        cem.load_particles(star)


def test_poses_optional_when_not_required(tmp_path):
    _stack(tmp_path / "s.mrcs")
    star = _write_sim_star(tmp_path, drop=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    ds = cem.load_particles(star, require_poses=False)
    assert ds.rotations is None and ds.images.shape == (4, 8, 8)


def test_stack_too_short(tmp_path):
    _stack(tmp_path / "s.mrcs", n=3)
    star = _write_sim_star(tmp_path, n=4)
    with pytest.raises(ValueError, match="has 3 images but the STAR file references image 4"):
        cem.load_particles(star)


def test_image_size_mismatch(tmp_path):
    _stack(tmp_path / "s.mrcs", d=8)
    star = _write_sim_star(tmp_path, box=16)
    with pytest.raises(ValueError, match="rlnImageSize.*16.*does not match the stack image size 8"):
        cem.load_particles(star)


def test_non_square_and_odd_images(tmp_path):
    _stack(tmp_path / "s.mrcs", value=np.zeros((4, 8, 6), np.float32))
    star = _write_sim_star(tmp_path)
    with pytest.raises(ValueError, match="non-square"):
        cem.load_particles(star)
    _stack(tmp_path / "s.mrcs", value=np.zeros((4, 7, 7), np.float32))
    star = _write_sim_star(tmp_path, box=7)
    with pytest.raises(ValueError, match="even size"):
        cem.load_particles(star)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_images(tmp_path):
    data = np.zeros((4, 8, 8), np.float32)
    data[2, 3, 3] = np.nan
    with mrcfile.new(tmp_path / "s.mrcs") as m:  # write_mrc refuses NaN data
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 1.0
    star = _write_sim_star(tmp_path)
    with pytest.raises(ValueError, match=r"particle images \[2\] contain NaN"):
        cem.load_particles(star)
    lazy = cem.load_particles(star, lazy=True)  # lazily: only when the bad image is read
    assert lazy.images[0:2].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="NaN"):
        lazy.images[2]
    lazy.images.close()


def test_unknown_optics_group_and_garbage(tmp_path):
    _stack(tmp_path / "s.mrcs")
    star = _write_sim_star(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnOpticsGroup"] = 3
    starfile.write(blocks, star)
    with pytest.raises(ValueError, match=r"optics group\(s\) \[3\]"):
        cem.load_particles(star)
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\n\nloop_\n_rlnFoo #1\n1\n")
    with pytest.raises(ValueError, match="rlnImageName"):
        cem.load_particles(bad)
    with pytest.raises(FileNotFoundError, match=r"STAR file .*missing\.star' not found"):
        cem.load_particles(tmp_path / "missing.star")


@pytest.mark.parametrize("pixel, shown", [(float("nan"), "nan"), (0.0, "0")])
def test_a_pixel_size_that_is_not_positive_is_named_in_the_files_words(tmp_path, pixel, shown):
    """NaN said "different pixel sizes [nan, ...]" and 0 said "pass apix=" (no such option
    on the command line)."""
    _stack(tmp_path / "s.mrcs")
    star = _write_sim_star(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = pixel
    starfile.write(blocks, star)
    with pytest.raises(ValueError, match=rf"pixel size of 4 particle\(s\) is {shown} A, not a positive number; "
                                         r"set it in the file") as info:
        cem.load_particles(star)
    assert "different pixel sizes" not in str(info.value)


def test_a_directory_given_as_a_file_is_named_as_one(tmp_path):
    (tmp_path / "d.star").mkdir()
    (tmp_path / "d.mrc").mkdir()
    (tmp_path / "d.pdb").mkdir()
    with pytest.raises(IsADirectoryError, match=r"STAR file .*d\.star' is a directory"):
        cem.load_particles(tmp_path / "d.star")
    with pytest.raises(IsADirectoryError, match=r"MRC file .*d\.mrc' is a directory"):
        cem.read_mrc(tmp_path / "d.mrc")
    with pytest.raises(IsADirectoryError, match=r"structure file .*d\.pdb' is a directory"):
        cem.load_atoms(tmp_path / "d.pdb")


# --------------------------------------------------------------------------- MRC


def test_mrc_axis_order_is_normalised(tmp_path):
    v = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(4, 6, 8)[:4, :4, :4].contiguous()  # [z, y, x]
    path = tmp_path / "perm.mrc"
    with mrcfile.new(path) as m:
        m.set_data(v.permute(2, 1, 0).contiguous().numpy())  # array axes: x, y, z
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1  # columns=z, rows=y, sections=x
        m.voxel_size = 2.5
    back, apix = cem.read_mrc(path)
    assert apix == 2.5 and torch.equal(back, v)


def test_write_mrc_errors(tmp_path):
    with pytest.raises(TypeError, match="floating"):
        cem.write_mrc(tmp_path / "a.mrc", np.zeros((4, 4, 4), np.int32), 1.0)
    with pytest.raises(ValueError, match="2D or 3D"):
        cem.write_mrc(tmp_path / "a.mrc", np.zeros((2, 4, 4, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match="apix"):
        cem.write_mrc(tmp_path / "a.mrc", np.zeros((4, 4, 4), np.float32), 0.0)
    with pytest.raises(FileNotFoundError, match=r"MRC file .*none\.mrc' not found"):
        cem.read_mrc(tmp_path / "none.mrc")
    # A stack round-trips with its values and voxel size.
    data = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    back, apix = cem.read_mrc(cem.write_mrc(tmp_path / "b.mrcs", data, 1.5))
    assert apix == pytest.approx(1.5) and torch.equal(back, torch.from_numpy(data))
