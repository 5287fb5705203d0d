"""Real particle sets (``--particles``): contrast against the CTF model, and the gold-standard
FSC without a ground truth (half sets, local alignment of the half maps, poses moved into
half 1's frame, the example's run without --reference, on one process and under torchrun)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fieldkern.cryoem as cem
from fieldkern.cryoem import data, evaluation

ROOT = Path(__file__).resolve().parents[2]


def _dataset(tmp_path, n=40, subset=None, D=16):
    images = torch.randn(n, D, D, generator=torch.Generator().manual_seed(0))
    extra = None if subset is None else {"rlnRandomSubset": subset}
    cem.write_mrc(tmp_path / "p.mrcs", images, 4.0)
    cem.write_particles_star(
        tmp_path / "p.star", image_names=[f"{i + 1:06d}@p.mrcs" for i in range(n)],
        euler_deg=torch.zeros(n, 3, dtype=torch.float64), dfu=15000.0, dfv=15000.0, dfang=0.0,
        apix=4.0, box=D, extra_columns=extra,
    )
    return cem.load_particles(tmp_path / "p.star")


def test_split_halves_follows_relion_subsets_or_splits_at_random(tmp_path):
    subset = torch.tensor([1, 2, 2, 1, 2] * 8)
    first, second = evaluation.split_halves(_dataset(tmp_path, subset=subset), seed=0)
    assert torch.equal(first, torch.nonzero(subset == 1).flatten())
    assert torch.equal(second, torch.nonzero(subset == 2).flatten())

    plain = tmp_path / "plain"
    plain.mkdir()
    ds = _dataset(plain, n=41)
    a, b = evaluation.split_halves(ds, seed=0)
    assert (len(a), len(b)) == (21, 20)
    assert torch.equal(torch.cat([a, b]).sort().values, torch.arange(41))
    assert torch.equal(a, a.sort().values)
    assert torch.equal(a, evaluation.split_halves(ds, seed=0)[0])       # seeded
    assert not torch.equal(a, evaluation.split_halves(ds, seed=1)[0])


@pytest.mark.parametrize("n, batch", [(3000, 1000), (41, 10), (1001, 600), (7, 2)])
def test_half_sets_take_their_own_seeds_and_under_marching_as_many_batches_as_the_whole_set(tmp_path, n, batch):
    from fieldkern.cryoem.config import ReconstructionConfig
    from fieldkern.cryoem.experiment import half_set_config

    halves = evaluation.split_halves(_dataset(tmp_path, n=n), seed=0)
    for marching in ("fixed", "fsc"):
        config = ReconstructionConfig(seed=5, batch_size=batch, marching=marching)
        for h, index in enumerate(halves, 1):
            cfg = half_set_config(config, h)
            assert cfg.seed == 5 + h - 1
            assert cfg.epochs == config.epochs and cfg.stage_epochs == config.stage_epochs
            if marching == "fixed":
                assert cfg.batch_size == batch
                continue
            # as many field steps per epoch as one run on every particle (to one, when the split rounds)
            full, half = math.ceil(n / batch), math.ceil(len(index) / cfg.batch_size)
            assert full - 1 <= half <= full + 1 and (n % 2 or half <= full)
    with pytest.raises(ValueError, match="a half set is 1 or 2"):
        half_set_config(config, 3)


def test_split_halves_refuses_bad_subsets(tmp_path):
    with pytest.raises(ValueError, match="rlnRandomSubset must be 1 or 2"):
        evaluation.split_halves(_dataset(tmp_path, subset=torch.tensor([1, 3] * 20)), seed=0)
    other = tmp_path / "one"
    other.mkdir()
    with pytest.raises(ValueError, match="both halves non-empty"):
        evaluation.split_halves(_dataset(other, subset=torch.ones(40, dtype=torch.long)), seed=0)


def test_local_alignment_recovers_a_small_drift_and_ignores_far_peaks(blob_volume):
    V = blob_volume(32)
    M = cem.axis_angle_to_matrix(torch.tensor([0.0, 0.04, 0.05], dtype=torch.float64))  # 3.7 degrees
    moved = cem.transform_volume(V, M, torch.tensor([0.6, -0.4, 0.8], dtype=torch.float64))
    res = cem.align_volume(moved, V, local=True)
    assert float(cem.angular_distance_deg(res.rotation, M.T)) < 0.5   # measured 0.27 (global: 0.27)
    assert torch.allclose(res.shift, -(M.T @ torch.tensor([0.6, -0.4, 0.8], dtype=torch.float64)), atol=0.05)
    assert res.score > 0.995  # two trilinear resamplings: the exact inverse scores 0.9978
    again = cem.fourier_shift(cem.transform_volume(moved, res.matrix), res.shift, 3)
    assert torch.allclose(again, res.volume, atol=1e-8)
    # A half-turned copy is not "nearly the same frame": the local search stays near identity.
    far = cem.transform_volume(V, cem.axis_angle_to_matrix(torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)))
    assert float(cem.angular_distance_deg(cem.align_volume(far, V, local=True).rotation, torch.eye(3))) < 90
    with pytest.raises(ValueError, match="cannot flip"):
        cem.align_volume(moved, V, local=True, flip=True)


def test_evaluate_half_maps_measures_agreement_of_noisy_halves(blob_volume):
    V = blob_volume(32)
    g = torch.Generator().manual_seed(0)
    noisy = [V + 0.02 * torch.randn(V.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    ev = evaluation.evaluate_half_maps([V, noisy[0]], [V, noisy[1]], apix=2.0)
    assert ev.fsc_against == "half maps" and ev.fsc_threshold == evaluation.HALF_MAP_THRESHOLD
    assert len(ev.resolution_angstrom) == len(ev.fsc) == 2
    assert ev.resolution_angstrom[0] == pytest.approx(4.0)         # identical halves: Nyquist
    assert 4.0 < ev.resolution_angstrom[1] < 20.0                  # the noise limits the second
    assert ev.alignment["rotation_deg"] < 1.0
    assert torch.allclose(ev.aligned_maps[1], (ev.half_maps[0][1] + ev.half_maps[1][1]) / 2)
    worse = evaluation.evaluate_half_maps([noisy[0]], [V + 0.2 * torch.randn(V.shape, generator=g,
                                                                           dtype=torch.float64)], apix=2.0)
    assert worse.resolution_angstrom[0] > ev.resolution_angstrom[1]


def test_poses_in_aligned_frame_explain_the_same_images(blob_volume):
    """project(V, R) = project(transform(V, M, t), R M^T) moved by the origin change."""
    V = blob_volume(32)
    M = cem.axis_angle_to_matrix(torch.tensor([0.05, -0.03, 0.06], dtype=torch.float64))
    t = torch.tensor([1.3, -0.7, 0.9], dtype=torch.float64)
    R = cem.random_rotations(3, generator=torch.Generator().manual_seed(1)).double()
    origins = torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 3.0]], dtype=torch.float64)
    apix = 2.0
    R2, origins2 = evaluation.poses_in_aligned_frame(R, origins, M, t, apix)
    # An image with origin o is the centred projection moved by -o / apix pixels.
    before = torch.stack([cem.fourier_shift(p, -o / apix, 2) for p, o in zip(cem.project(V, R), origins)])
    after = torch.stack([cem.fourier_shift(p, -o / apix, 2)
                         for p, o in zip(cem.project(cem.transform_volume(V, M, t), R2), origins2)])
    err = (after - before).abs().max() / before.abs().max()
    # Trilinear resampling alone costs 2.7% here (t = 0); measured 3.9% with this t.
    assert err < 0.05
    # Leaving the origins alone (or the poses) would not explain them.
    kept = torch.stack([cem.fourier_shift(p, -o / apix, 2)
                        for p, o in zip(cem.project(cem.transform_volume(V, M, t), R2), origins)])
    assert (kept - before).abs().max() / before.abs().max() > 5 * err


@pytest.mark.parametrize("mirrored", [False, True])
def test_poses_in_reference_frame_are_proper_and_explain_the_same_images(blob_volume, mirrored):
    """The poses of a map aligned to a reference by M (a mirroring one too) give the same
    images of the reference, as proper rotations."""
    V = blob_volume(32)
    G = cem.axis_angle_to_matrix(torch.tensor([0.4, -1.1, 0.7], dtype=torch.float64))
    M = G @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)) if mirrored else G
    estimate = cem.transform_volume(V, M.T, torch.zeros(3, dtype=torch.float64))  # transform(estimate, M) = V
    R = cem.random_rotations(3, generator=torch.Generator().manual_seed(1)).double()
    R_ref = evaluation.poses_in_reference_frame(R, M)
    assert torch.allclose(torch.linalg.det(R_ref), torch.ones(3, dtype=torch.float64))
    before, after = cem.project(estimate, R), cem.project(V, R_ref)
    err = (after - before).abs().max() / before.abs().max()
    assert err < 0.05  # trilinear resampling of the estimate: ~3%
    # the pose as the map's own (what the mirrored run would report) explains other images
    assert (cem.project(V, R) - before).abs().max() / before.abs().max() > 5 * err


def _run(*args, cwd, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *launcher, str(ROOT / "examples" / "cryoem.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


@pytest.fixture(scope="module")
def particle_set(tmp_path_factory):
    """A tiny simulated RELION particle set (with rlnRandomSubset), read back as real data."""
    root = tmp_path_factory.mktemp("halves")
    proc = _run("--preset", "tiny", "--out", str(root / "sim"), "--no-progress", "--device", "cpu", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sim" / "data" / "particles.star"


HALF_ARGS = ("--preset", "tiny", "--no-progress", "--device", "cpu")


@pytest.fixture(scope="module")
def half_run(particle_set):
    out = particle_set.parents[2] / "one_process"
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--out", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_example_without_reference_reports_half_map_resolution(particle_set, half_run):
    out, proc = half_run
    assert "resolution at FSC 0.143 vs half maps" in proc.stdout
    assert "pose change from the file's poses (deg)" in proc.stdout
    for name in ("half1_scale2.mrc", "half2_scale2.mrc", "reconstruction_scale2.mrc", "half1_stage0_scale0.mrc",
                 "half2_stage2_scale2.mrc", "checkpoint_half1.pt", "checkpoint_half2.pt", "fsc.csv", "fsc.png",
                 "poses.star"):
        assert (out / name).is_file(), name
    assert not (out / "ground_truth.mrc").exists() and not (out / "checkpoint.pt").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["fsc_against"] == "half maps" and results["fsc_threshold"] == pytest.approx(0.143)
    assert len(results["resolution_angstrom"]) == 3 and len(results["loss_per_epoch_halves"]) == 2
    # A particle set's own poses are the start, refined (not perturbed as in the simulations).
    assert results["settings"]["pose_init"] == "refine"
    assert results["pose_error_deg"]["initial"]["mean"] < 1e-5
    assert results["pose_error_deg"]["final"]["mean"] > 0
    # The simulator's rlnRandomSubset made the halves; every particle keeps its pose row.
    ds = cem.load_particles(out / "poses.star")
    assert len(ds) == 120
    half1, half2 = cem.read_mrc(out / "half1_scale2.mrc")[0], cem.read_mrc(out / "half2_scale2.mrc")[0]
    both = cem.read_mrc(out / "reconstruction_scale2.mrc")[0]
    assert np.allclose(both.numpy(), ((half1 + half2) / 2).numpy(), atol=1e-6)
    # The halves were trained from different seeds (independent initial fields).
    settings = torch.load(out / "checkpoint_half2.pt", weights_only=True)["config"]
    assert settings["seed"] == torch.load(out / "checkpoint_half1.pt", weights_only=True)["config"]["seed"] + 1
    # Resuming a finished run trains nothing more and gives the same maps.
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--out", str(out), "--resume", cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["resolution_angstrom"] == results["resolution_angstrom"]


def test_torchrun_half_maps_match_one_process(particle_set, half_run, tmp_path):
    """Every rank must take the half-map path (only rank 0 reads a --reference map, so the
    choice cannot hang on the map itself), and two processes train each half as one does."""
    one, _ = half_run
    out = tmp_path / "torchrun"
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--out", str(out), cwd=tmp_path,
                launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("vs half maps") == 3
    for h in (1, 2):
        for k in range(3):
            a = cem.read_mrc(one / f"half{h}_stage{k}_scale{k}.mrc")[0]
            b = cem.read_mrc(out / f"half{h}_stage{k}_scale{k}.mrc")[0]
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        ra = torch.load(one / f"checkpoint_half{h}.pt", weights_only=True)["rotations"]
        rb = torch.load(out / f"checkpoint_half{h}.pt", weights_only=True)["rotations"]
        assert (ra - rb).abs().max() < 1e-5


def test_particles_without_angles_start_only_ab_initio(particle_set, tmp_path):
    """A STAR file with no Euler angles: --pose-init random reconstructs both halves ab
    initio (each with a hand of its own: the halves are aligned by a global search that may
    mirror); any init that needs the file's poses is refused by name."""
    import starfile

    blocks = starfile.read(particle_set, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    star = particle_set.parent / "no_angles.star"
    starfile.write(blocks, star)
    proc = _run(*HALF_ARGS, "--particles", str(star), "--out", str(tmp_path / "refine"), cwd=tmp_path)
    assert proc.returncode == 1 and "no poses to start from" in proc.stderr and "--pose-init random" in proc.stderr
    out = tmp_path / "ab_initio"
    proc = _run(*HALF_ARGS, "--particles", str(star), "--pose-init", "random", "--pose-search", "96", "--out", str(out),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fsc_against"] == "half maps" and results["pose_error_deg"] is None
    assert results["settings"]["reconstruction"]["pose_search"] == 96
    ds = cem.load_particles(out / "poses.star")  # the found poses, written as angles
    assert len(ds) == 120 and torch.allclose(torch.linalg.det(ds.rotations), torch.ones(120, dtype=torch.float64))


def test_contrast_opposite_to_the_ctf_model_is_refused(particle_set, tmp_path):
    ds = cem.load_particles(particle_set)
    z = data.contrast_score(ds)
    assert z > 10  # measured 24.9 on these 120 tiny particles
    inverted = cem.load_particles(particle_set, invert=True)
    assert data.contrast_score(inverted) == pytest.approx(-z)
    with pytest.raises(ValueError, match="pass --invert"):
        data.check_contrast(inverted, inverted=False)
    with pytest.raises(ValueError, match="leave that out"):
        data.check_contrast(inverted, inverted=True)
    data.check_contrast(ds, inverted=False)
    # Noise alone scores near zero and is let through.
    noise = _dataset(tmp_path)
    assert abs(data.contrast_score(noise)) < 5
    # The command line: --invert on these (dark) particles is refused before any training.
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--invert", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 1 and "contrast is opposite" in proc.stderr and "leave that out" in proc.stderr
    proc = _run("--invert", cwd=tmp_path)
    assert proc.returncode == 2 and "--invert needs --particles" in proc.stderr


def test_downsampled_particles_keep_their_frequencies(particle_set):
    ds = cem.load_particles(particle_set)
    small = ds.downsample(8)
    assert (small.box, small.apix, len(small)) == (8, ds.apix * 2, len(ds))
    assert small.stack_geometry == (ds.box, ds.apix) and small.images.shape == (len(ds), 8, 8)
    assert torch.allclose(small.images[:], cem.fourier_crop(ds.images[:], 8, 2))
    assert torch.allclose(small.images[3], cem.fourier_crop(ds.images[3], 8, 2))
    assert torch.allclose(small.images[torch.tensor([5, 1])], cem.fourier_crop(ds.images[[5, 1]], 8, 2))
    # The same frequencies in 1/A: the small CTF is the centre of the large one.
    big, little = ds.ctf(slice(0, 5), dtype=torch.float64), small.ctf(slice(0, 5), dtype=torch.float64)
    assert torch.allclose(little, big[:, 4:12, 4:12], atol=1e-12)
    assert ds.downsample(16) is ds
    with pytest.raises(ValueError, match="must be <= 16"):
        ds.downsample(18)
    with pytest.raises(ValueError, match="even"):
        ds.downsample(7)


def test_a_downsampled_set_never_holds_the_stack_at_its_stored_size(particle_set):
    """--downsample maps the stack and crops each block as it is read."""
    reference = particle_set.parent / "ground_truth.mrc"
    loaded = data.prepare_data("4ake", particle_set.parent, None, 0, particles=str(particle_set),
                               reference=str(reference), progress=False, downsample=8)
    images = loaded.dataset.images
    assert isinstance(images, cem.io.particles.CroppedImages) and isinstance(images.images, cem.ImageStack)
    full = data.prepare_data("4ake", particle_set.parent, None, 0, particles=str(particle_set), progress=False)
    assert isinstance(full.dataset.images, torch.Tensor)  # one process, stored size: read at once
    torch.testing.assert_close(images[:], cem.fourier_crop(full.dataset.images, 8, 2), rtol=0, atol=0)


def test_example_downsamples_particles_and_their_reference(particle_set, tmp_path):
    out = tmp_path / "small"
    reference = particle_set.parent / "ground_truth.mrc"
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--reference", str(reference), "--downsample", "12",
                "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["box"], results["apix"], results["fsc_against"]) == (12, 8.0, "ground truth")
    gt, apix = cem.read_mrc(out / "ground_truth.mrc")
    assert tuple(gt.shape) == (12, 12, 12) and apix == pytest.approx(8.0)
    # poses.star names the original 16-pixel stack, so it keeps that box and pixel size.
    ds = cem.load_particles(out / "poses.star")
    assert (ds.box, ds.apix, len(ds)) == (16, 6.0, 120)
    proc = _run("--downsample", "12", cwd=tmp_path)
    assert proc.returncode == 2 and "--downsample needs --particles" in proc.stderr
    proc = _run(*HALF_ARGS, "--particles", str(particle_set), "--downsample", "20", "--out", str(tmp_path / "o"),
                cwd=tmp_path)
    assert proc.returncode == 1 and "must be <= 16" in proc.stderr
