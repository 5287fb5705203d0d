"""The trainer's forward models (fieldkern.cryoem.forward_model) agree with each other, and
the spherical support (ReconstructionConfig.support)."""

import pytest
import torch
from _cryoem_helpers import random_blobs

from fieldkern.cryoem import random_rotations
from fieldkern.cryoem.forward_model import FORWARD_MODELS, forward_model
from fieldkern.cryoem.fourier import fft2_centered
from fieldkern.cryoem.config import ReconstructionConfig
from fieldkern.cryoem.reconstruct import Reconstruction

D = 16


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vol = random_blobs(D, g)
    R = random_rotations(n, generator=g)
    images = torch.randn(n, D, D, generator=g)
    k = torch.arange(D, dtype=torch.float32) - D // 2
    ctf = torch.cos(0.02 * (k[:, None] ** 2 + k[None, :] ** 2)).expand(n, D, D)  # even
    return vol, R, fft2_centered(images), ctf


def losses(name, vol, R, spectra, ctf, posed=False):
    model = forward_model(name, D)
    target, c = model.select(spectra), model.select(ctf)
    if posed:
        prepared = model.prepare(vol, for_poses=True)
        return model.per_image_loss(model.predict_posed(prepared, R, c), target)
    return model.per_image_loss(model.predict(model.prepare(vol), model.bind(R), c), target)


@pytest.mark.parametrize("posed", [False, True])
def test_the_forward_models_give_the_same_losses(posed):
    vol, R, spectra, ctf = batch()
    reference = losses("grid_sample", vol, R, spectra, ctf, posed)
    # The taps: the same slices on the half plane (measured within 1e-4: they differ only
    # where a tap reaches the padded Nyquist planes, in the plane's corners).
    torch.testing.assert_close(losses("fourier", vol, R, spectra, ctf, posed), reference, rtol=1e-3, atol=0)
    # Real-space projection: ~3% from central slices on the image grid (wrap-around).
    torch.testing.assert_close(losses("real", vol, R, spectra, ctf, posed), reference, rtol=0.05, atol=0)


def test_pose_gradients_of_the_models_agree():
    """Gradients with respect to a rotation perturbation, from poses 3 degrees off data made
    by the reference model: all three point the same way."""
    from fieldkern.cryoem import axis_angle_to_matrix, jitter_rotations

    vol, R, _, ctf = batch(seed=1)
    reference = forward_model("grid_sample", D)
    # the reference's noiseless CTF-modulated slices, as centred (n, D, D) image spectra
    spectra = reference.predict(reference.prepare(vol), reference.bind(R), reference.select(ctf)).reshape(-1, D, D)
    start = jitter_rotations(R.double(), 3.0, 3.0, generator=torch.Generator().manual_seed(4)).float()
    grads = {}
    for name in FORWARD_MODELS:
        omega = torch.zeros(len(R), 3, requires_grad=True)
        losses(name, vol, axis_angle_to_matrix(omega) @ start, spectra, ctf, posed=True).sum().backward()
        grads[name] = omega.grad
    cosine = {name: torch.nn.functional.cosine_similarity(grads[name], grads["grid_sample"], dim=1)
              for name in ("fourier", "real")}
    assert cosine["fourier"].min() > 0.99, cosine  # the same slices, smooth gradient: measured >= 0.999
    # Real-space projections differ from central slices by ~3%, and so do their optima:
    # measured 0.90-0.999 for five images, 0.47 for one.
    assert cosine["real"].median() > 0.95 and cosine["real"].min() > 0, cosine


def test_unknown_projector():
    with pytest.raises(ValueError, match="projector"):
        forward_model("slices", D)
    with pytest.raises(ValueError, match="projector"):
        ReconstructionConfig(projector="slices")


def config(**kw):
    base = dict(hidden_features=16, n_scales=2, epochs=2, stage_epochs=(1,), batch_size=20, volume_steps=2,
                pose_steps=2, refine_poses=True, pose_start_stage=0)
    return ReconstructionConfig(**{**base, **kw})


def test_spherical_support_zeroes_the_corners_and_trains():
    _, R, spectra, ctf = batch(n=40)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    rec = Reconstruction(images, ctf, R, config(support="sphere"))
    c = torch.arange(D) - D // 2
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    before = [p.detach().clone() for p in rec.model.parameters()]
    rec.fit(progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, rec.model.parameters()))
    for v in rec.volumes():
        assert torch.all(v[r2 > (D // 2) ** 2] == 0)
        assert v[r2 <= (D // 2) ** 2].abs().max() > 0
    box = Reconstruction(images, ctf, R, config())
    assert (box.volume().detach()[r2 > (D // 2) ** 2] != 0).any()
    with pytest.raises(ValueError, match="support"):
        config(support="cube")


@pytest.mark.parametrize("projector", list(FORWARD_MODELS))
def test_every_projector_trains_the_field_and_the_poses(projector):
    _, R, spectra, ctf = batch(n=40, seed=2)
    images = torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))).real
    rec = Reconstruction(images, ctf, R, config(projector=projector))
    before = [p.detach().clone() for p in rec.model.parameters() if p.requires_grad]
    losses = rec.fit(progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = [p.detach() for p in rec.model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # the field trained
    assert not torch.allclose(rec.rotations, R.double())  # the poses moved


@pytest.mark.parametrize("projector, min_cosine", [("fourier", 0.9999), ("real", 0.8)])
def test_every_projector_has_the_volume_gradient_of_the_reference(projector, min_cosine):
    """The loss's gradient in the volume through each projector points where grid_sample's
    (autograd) does: the taps compute the same slices (measured cosine 0.999997, norms within
    1e-5); real-space ray sums are another discretisation (0.870, norm 1.57x, at D = 16)."""
    vol, R, spectra, ctf = batch(n=12, seed=2)
    grads = {}
    for name in ("grid_sample", projector):
        model = forward_model(name, D)
        v = (vol * 0.8 + 0.05).requires_grad_()  # not the truth: the gradient is not ~0
        loss = model.per_image_loss(model.predict(model.prepare(v), model.bind(R), model.select(ctf)),
                                    model.select(spectra)).sum()
        grads[name] = torch.autograd.grad(loss, v)[0].flatten()
    cosine = torch.nn.functional.cosine_similarity(grads[projector], grads["grid_sample"], dim=0)
    assert cosine > min_cosine
