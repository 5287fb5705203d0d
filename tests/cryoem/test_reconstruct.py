"""The cryo-EM reconstruction trainer: convergence with known poses, pose recovery,
checkpoint/resume, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cryoem_helpers import random_blobs

from fieldkern.cryoem import (
    apply_ctf,
    ctf,
    fourier_shell_correlation,
    fourier_shift,
    jitter_rotations,
    load_particles,
    project,
    random_rotations,
    write_mrc,
    write_particles_star,
)
from fieldkern.cryoem.fourier_slice import central_slices, volume_spectrum
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.poses import pose_errors_deg, refine_poses, search_poses
from fieldkern.cryoem.reconstruct import Reconstruction
from fieldkern.train import Callback

ROOT = Path(__file__).resolve().parents[2]
D = 16


def blobs(D, seed=0):
    return random_blobs(D, torch.Generator().manual_seed(seed))


def particles(n, seed=0, apix=4.0):
    """Clean images of the blob volume with per-image CTFs (unpadded, as the trainer models)."""
    vol = blobs(D)
    R = random_rotations(n, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    dfu = 15000 + 5000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctfs = ctf(D, apix, dfu, dfu - 200, torch.zeros(n, dtype=torch.float64))
    images = apply_ctf(project(vol, R), ctfs)
    return vol, images, ctfs, R


def small_config(**kw):
    base = dict(hidden_features=32, n_scales=2, epochs=10, stage_epochs=(3,), batch_size=100,
                volume_steps=5, pose_steps=0, volume_lr=5e-3, refine_poses=False)
    base.update(kw)
    return ReconstructionConfig(**base)


def test_known_pose_reconstruction_converges():
    torch.manual_seed(0)
    vol, images, ctfs, R = particles(300)
    rec = Reconstruction(images, ctfs, R, small_config(epochs=25, stage_epochs=(5,)))
    rec.fit(progress=False)
    coarse, final = rec.volumes()
    _, fsc = fourier_shell_correlation(final.double(), vol.double())
    _, fsc_coarse = fourier_shell_correlation(coarse.double(), vol.double())
    # Coarse to fine: the finer scale improves on the coarse one (measured at shells 1-4:
    # 0.946/0.887/0.546/0.291 -> 0.994/0.983/0.689/0.424).
    assert torch.all(fsc[1:5] > fsc_coarse[1:5]), (fsc, fsc_coarse)
    # Shells 1-2 lie inside the CTFs' first zero (~shell 3.4 at 15000-20000 A, 4 A pixels):
    # measured 0.994 / 0.983; shell 3, next to the zero, converges far more slowly (0.69).
    assert fsc[1:3].min() > 0.95, fsc
    assert rec.state.losses[-1] < rec.state.losses[3]  # still improving in the last stage


def test_pose_refinement_recovers_perturbed_poses_of_a_known_volume():
    vol, _, ctfs, R = particles(40, seed=3)
    start = jitter_rotations(R.double(), 4.0, 8.0, generator=torch.Generator().manual_seed(0))
    spectrum = volume_spectrum(vol)
    # Data from the trainer's own forward model, so that the loss's minimum is the truth
    # (real-space projections differ from central slices by ~3%, which moves it).
    target = ctfs.float() * central_slices(spectrum, R.float(), D)

    def losses(rot):
        return (ctfs.float() * central_slices(spectrum, rot.float(), D) - target).abs().square().mean((-2, -1))

    refined = refine_poses(losses, start, steps=80, lr=1e-2, generator=torch.Generator().manual_seed(1))
    before, after = pose_errors_deg(start, R), pose_errors_deg(refined, R)
    assert before.mean() > 4
    assert after.mean() < 1.0, after  # measured ~0.3 degrees
    assert torch.allclose(refined @ refined.transpose(-1, -2), torch.eye(3, dtype=refined.dtype), atol=1e-9)


def test_global_search_brings_back_poses_that_local_steps_cannot():
    """From random poses (far outside local refinement's reach) a search over 4608 grid
    rotations puts every image about as close to its true pose as the grid allows; a pose
    that is already exact stays."""
    from fieldkern.cryoem import super_fibonacci_rotations

    vol, _, ctfs, R = particles(60, seed=4)
    spectrum = volume_spectrum(vol)
    targets = ctfs.float() * central_slices(spectrum, R.float(), D)
    start = random_rotations(60, generator=torch.Generator().manual_seed(9)).double()
    grid = super_fibonacci_rotations(4608)
    found, moved = search_poses(spectrum, start, targets, ctfs, grid)
    before, after = pose_errors_deg(start, R), pose_errors_deg(found, R)
    assert before.mean() > 90 and moved.all()
    # The grid's nearest rotations to the truth are 7.4 degrees off on average (13.1 at most);
    # measured: mean 8.4, max 18.2 (one image picks a neighbouring grid point at D = 16).
    assert after.mean() < 10 and after.max() < 20, after
    kept, moved = search_poses(spectrum, R.double(), targets, ctfs, grid)
    assert not moved.any() and torch.equal(kept, R.double())


def test_search_draws_follow_the_tempered_posterior():
    """Inverse-CDF draws of one image's candidates hit each with probability
    exp(-fit / (2 T noise)) / Z; a candidate of weight 0 is never drawn."""
    from fieldkern.cryoem.poses import _draw_poses

    n, T, noise = 40_000, 2.0, 0.5
    fit = torch.tensor([3.0, 1.0, 2.0, 1.5, 1e4], dtype=torch.float64).expand(n, 5)
    picks = _draw_poses(fit, torch.full((n,), noise), T, torch.rand(n, generator=torch.Generator().manual_seed(0),
                                                                   dtype=torch.float64))
    expected = torch.softmax(-fit[0] / (2 * T * noise), 0)
    seen = torch.bincount(picks, minlength=5).double() / n
    assert seen[4] == 0 and expected[4] < 1e-300
    # binomial standard error at n = 40,000 is <= 0.0025: 4 of them
    assert (seen - expected).abs().max() < 0.01, (seen, expected)


def test_search_at_a_temperature_draws_near_the_best_fit_and_per_image():
    """A draw at a small temperature is the best fit; at a large one the draws spread out;
    an image's draw is the same whether searched alone or with others."""
    from fieldkern.cryoem import super_fibonacci_rotations

    vol, _, ctfs, R = particles(40, seed=4)
    spectrum = volume_spectrum(vol)
    targets = ctfs.float() * central_slices(spectrum, R.float(), D)
    start = random_rotations(40, generator=torch.Generator().manual_seed(9)).double()
    grid = super_fibonacci_rotations(576)
    u = torch.rand(40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    best, _ = search_poses(spectrum, start, targets, ctfs, grid)
    cold, _ = search_poses(spectrum, start, targets, ctfs, grid, temperature=1e-6, uniforms=u)
    assert torch.equal(cold, best)
    hot, moved = search_poses(spectrum, start, targets, ctfs, grid, temperature=1e4, uniforms=u)
    assert moved.float().mean() > 0.9
    assert pose_errors_deg(hot, best).median() > 60  # measured 131: nearly uniform draws
    # clean images: the residual's noise level is tiny, so it takes T = 100 for half the
    # draws to leave the best fit (measured 52%)
    warm, _ = search_poses(spectrum, start, targets, ctfs, grid, temperature=100.0, uniforms=u)
    assert 0.2 < (pose_errors_deg(warm, best) > 0).float().mean() < 0.8
    halves = [search_poses(spectrum, start[s], targets[s], ctfs[s], grid, temperature=100.0, uniforms=u[s])[0]
              for s in (slice(0, 13), slice(13, 40))]
    assert torch.equal(torch.cat(halves), warm)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            search_poses(spectrum, start, targets, ctfs, grid, temperature=bad, uniforms=u)
    with pytest.raises(ValueError, match=r"needs uniforms of shape \(40,\)"):
        search_poses(spectrum, start, targets, ctfs, grid, temperature=1.0)


def test_reconstruction_searches_from_the_second_stage(monkeypatch):
    from fieldkern.cryoem import reconstruct

    _, images, ctfs, R = particles(40)
    start = random_rotations(40, generator=torch.Generator().manual_seed(2)).double()
    temperatures = []

    def spy(*args, **kw):
        temperatures.append(args[6])
        return search_poses(*args, **kw)

    monkeypatch.setattr(reconstruct, "search_poses", spy)
    rec = Reconstruction(images, ctfs, start, small_config(
        n_scales=3, epochs=4, stage_epochs=(1, 3), refine_poses=True, pose_steps=2, pose_search=96, batch_size=20,
        search_temperature=10.0))
    stages = []
    search = rec._search_poses
    rec._search_poses = lambda stage, epoch: stages.append((stage, epoch)) or search(stage, epoch)
    rec.fit(progress=False)
    assert stages == [(1, 1), (1, 2), (2, 3)]  # none in the coarsest stage (epoch 0)
    assert temperatures == [10.0, 10.0, 0.0]  # draws before the last stage, the best fit at it
    assert torch.allclose(rec.rotations @ rec.rotations.transpose(-1, -2), torch.eye(3, dtype=torch.float64),
                          atol=1e-9)
    with pytest.raises(ValueError, match="pose_search"):
        small_config(pose_search=-1)
    with pytest.raises(ValueError, match="search_temperature must be >= 0"):
        small_config(search_temperature=-0.5)


class _Interrupt(Callback):
    def __init__(self, after):
        self.after = after

    def on_step_end(self, step, stage, loss):
        if step + 1 == self.after:
            raise KeyboardInterrupt


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    _, images, ctfs, R = particles(120, seed=5)
    start = jitter_rotations(R.double(), 0.0, 10.0, generator=torch.Generator().manual_seed(2))
    cfg = small_config(epochs=4, stage_epochs=(1,), pose_steps=3, refine_poses=True, pose_start_stage=0)

    full = Reconstruction(images, ctfs, start, cfg)
    full.fit(tmp_path / "full.pt", progress=False)

    ckpt = tmp_path / "interrupted.pt"
    first = Reconstruction(images, ctfs, start, cfg)
    with pytest.raises(KeyboardInterrupt):
        first.fit(ckpt, progress=False, callbacks=[_Interrupt(after=2)])
    resumed = Reconstruction(images, ctfs, start, cfg)
    resumed.load(ckpt)
    assert resumed.state.epoch == 2
    resumed.fit(ckpt, progress=False)

    assert torch.equal(resumed.rotations, full.rotations)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.state.losses == full.state.losses


def test_checkpoint_from_other_settings_or_corrupt_is_refused(tmp_path):
    _, images, ctfs, R = particles(50)
    rec = Reconstruction(images, ctfs, R, small_config(epochs=1, stage_epochs=(0 + 1,), n_scales=2))
    path = tmp_path / "c.pt"
    rec.save(path)
    other = Reconstruction(images, ctfs, R, small_config(epochs=1, stage_epochs=(1,), volume_lr=1e-4))
    with pytest.raises(ValueError, match="other settings.*volume_lr"):
        other.load(path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        rec.load(bad)


def test_shifts_centre_the_particles_before_fitting(tmp_path):
    """RELION stores off-centre particles with the shift that centres them; the trainer's
    spectra of shifted images with those shifts are the centred images' spectra."""
    _, images, ctfs, R = particles(20)
    g = torch.Generator().manual_seed(5)
    shifts = torch.cat([torch.randint(-3, 4, (10, 2), generator=g).double(),    # whole pixels
                        6 * torch.rand(10, 2, generator=g, dtype=torch.float64) - 3])  # sub-pixel
    off_centre = torch.stack([fourier_shift(im, -t, 2) for im, t in zip(images, shifts)])
    cfg = small_config()
    centred = Reconstruction(images, ctfs, R, cfg).spectra
    fixed = Reconstruction(off_centre, ctfs, R, cfg, shifts=shifts).spectra
    # Sub-pixel shifts of a real image lose the Nyquist row/column's odd part: compare the rest.
    err = (fixed - centred)[:, 1:, 1:].abs().max() / centred.abs().max()
    assert err < 1e-5
    assert torch.allclose(fixed[:10], centred[:10], atol=1e-4 * float(centred.abs().max()))
    # Through a RELION file: rlnOriginX/YAngst = shift * apix, as examples/cryoem.py passes them.
    write_mrc(tmp_path / "p.mrcs", off_centre, 4.0)
    write_particles_star(tmp_path / "p.star", image_names=[f"{i + 1}@p.mrcs" for i in range(20)],
                         euler_deg=torch.zeros(20, 3, dtype=torch.float64), dfu=15000.0, dfv=15000.0,
                         dfang=0.0, apix=4.0, box=D, shifts_A=shifts * 4.0)
    ds = load_particles(tmp_path / "p.star")
    read = Reconstruction(ds.images, ctfs, R, cfg, shifts=ds.shifts_A / ds.apix).spectra
    assert torch.allclose(read, fixed, atol=1e-5 * float(centred.abs().max()))
    wrong_sign = Reconstruction(off_centre, ctfs, R, cfg, shifts=-shifts).spectra
    assert (wrong_sign - centred)[:, 1:, 1:].abs().max() / centred.abs().max() > 0.1
    with pytest.raises(ValueError, match="shifts must have shape"):
        Reconstruction(images, ctfs, R, cfg, shifts=shifts[:, :1])
    with pytest.raises(ValueError, match="shifts holds NaN"):
        Reconstruction(images, ctfs, R, cfg, shifts=shifts * float("nan"))


def test_bad_inputs():
    _, images, ctfs, R = particles(20)
    cfg = small_config()
    nan = images.clone()
    nan[3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Reconstruction(nan, ctfs, R, cfg)
    with pytest.raises(ValueError, match="rotations must have shape"):
        Reconstruction(images, ctfs, R[:5], cfg)
    with pytest.raises(ValueError, match="images must have shape"):
        Reconstruction(images[0], ctfs, R, cfg)
    rec = Reconstruction(images, torch.ones(20, 2 * D, 2 * D), R, cfg)
    with pytest.raises(ValueError, match="CTFs must be"):
        rec.train_epoch(0, 0)
    with pytest.raises(ValueError, match="projector"):
        small_config(projector="slices")
    with pytest.raises(ValueError, match="stage_epochs"):
        small_config(stage_epochs=(1, 2))


def run_example(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "cryoem.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_example_tiny_preset_writes_every_output(tmp_path):
    out = tmp_path / "run"
    proc = run_example("--preset", "tiny", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ground_truth.mrc", "reconstruction_scale0.mrc", "reconstruction_scale2.mrc",
                 "stage0_scale0.mrc", "stage1_scale1.mrc", "stage2_scale2.mrc",
                 "fsc.csv", "fsc.png", "slices.png", "poses.star", "results.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["nyquist_angstrom"] == pytest.approx(12.0)
    assert len(results["resolution_angstrom"]) == 3
    assert set(results["pose_error_deg"]) == {"initial", "final", "final_aligned"}
    assert results["n_particles"] == 120 and results["box"] == 16
    assert "resolution at FSC 0.5" in proc.stdout
    # The refined poses read back as a RELION particle set with the same images.
    from fieldkern.cryoem import load_particles

    ds = load_particles(out / "poses.star")
    assert len(ds) == 120 and ds.box == 16


def test_example_reports_bad_input(tmp_path):
    proc = run_example("--particles", str(tmp_path / "missing.star"), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "missing.star" in proc.stderr and "not found" in proc.stderr
    proc = run_example("--reference", "x.mrc", cwd=tmp_path)
    assert proc.returncode == 2 and "--reference needs --particles" in proc.stderr


def test_quick_preset_geometry_per_structure():
    from fieldkern.cryoem.presets import cryoem_preset

    assert (cryoem_preset("quick", "4ake").box, cryoem_preset("quick", "4ake").apix) == (32, 3.0)
    p = cryoem_preset("quick", "1ol5")
    assert (p.box, p.apix) == (40, 2.4)
    assert cryoem_preset("quick", "1ol5", box=36).box == 36  # the user's choice wins
    assert cryoem_preset("quick", "1ol5", apix=3.0).box == 32
    assert cryoem_preset("paper", "1ol5").box == 80
