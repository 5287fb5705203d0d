"""CTF physics and conventions, CTF application, and noise at a target SNR."""

import math

import pytest
import torch

import fieldkern.cryoem as cem

F64 = torch.float64


def test_wavelength():
    # 0.019687 A at 300 kV (0.01968762 to more digits), 0.025079 A at 200 kV.
    assert 0.019687 <= cem.electron_wavelength(300.0) < 0.019688
    assert 0.025079 <= cem.electron_wavelength(200.0) < 0.025080
    v = 300e3
    assert cem.electron_wavelength(300.0) == 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))
    t = cem.electron_wavelength(torch.tensor([300.0, 200.0]))
    assert torch.allclose(
        t, torch.tensor([cem.electron_wavelength(300.0), cem.electron_wavelength(200.0)], dtype=F64)
    )


def test_ctf_shape_origin_and_batching():
    dfu = torch.tensor([15000.0, 18000.0, 20000.0])
    c = cem.ctf(32, 1.5, dfu, dfu - 200, 30.0, w=0.07)
    assert c.shape == (3, 32, 32) and c.dtype == torch.float32
    assert torch.allclose(c[:, 16, 16], torch.full((3,), -0.07))
    # Each batch entry equals the unbatched call.
    one = cem.ctf(32, 1.5, 18000.0, 17800.0, 30.0, w=0.07)
    assert torch.allclose(c[1], one)
    # Parameters broadcast against each other: (2, 1) x (3,) -> (2, 3, D, D).
    c2 = cem.ctf(16, 2.0, dfu, dfu, torch.tensor([[0.0], [45.0]]))
    assert c2.shape == (2, 3, 16, 16)
    assert abs(cem.ctf(16, 1.0, 1e4, 1e4, 0.0, phase_shift=90.0)[8, 8] + math.sqrt(1 - 0.01)) < 1e-6


def _zero_radii(df, volt=300.0, cs=2.7, w=0.1, n_zeros=4):
    """|k| (1/A) of the first CTF zeros for defocus df (no astigmatism), solved analytically.

    CTF = sqrt(1-w^2) sin g - w cos g = 0  <=>  g = atan(w / sqrt(1-w^2)) + n pi, and
    g(s) = -pi df lam s^2 + (pi/2) Cs lam^3 s^4 decreases from 0 at low s: n = -1, -2, ...
    """
    lam = cem.electron_wavelength(volt)
    a = 0.5 * math.pi * cs * 1e7 * lam**3
    b = -math.pi * df * lam
    k3 = math.atan(w / math.sqrt(1 - w * w))
    out = []
    for n in range(-1, -n_zeros - 1, -1):
        c = -(k3 + n * math.pi)
        u = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)  # s^2, the low-frequency root
        out.append(math.sqrt(u))
    return out


def test_ctf_zeros_at_analytic_positions():
    df, apix, D = 15000.0, 1.0, 256
    radii = _zero_radii(df)
    # 1) The CTF vanishes there, in every direction.
    for s in radii:
        for ang in (0.0, 1.0, 2.5):
            kx = torch.tensor(s * math.cos(ang), dtype=F64)
            ky = torch.tensor(s * math.sin(ang), dtype=F64)
            assert abs(float(cem.evaluate_ctf(kx, ky, df, df, 0.0))) < 1e-9
    # 2) On the pixel grid, the sign changes along +kx fall between the bracketing pixels.
    c = cem.ctf(D, apix, df, df, 0.0, dtype=F64)
    row = c[D // 2, D // 2 :]
    k = torch.arange(D // 2, dtype=F64) / (D * apix)
    changes = torch.nonzero(torch.sign(row[1:]) != torch.sign(row[:-1])).flatten()
    for s, j in zip(radii, changes.tolist()):
        assert k[j] <= s <= k[j + 1]
    # And along +ky (rows) the same, since the CTF is isotropic without astigmatism.
    assert torch.allclose(c[D // 2 :, D // 2], row)


def test_defocus_u_is_along_the_defocus_angle():
    """With dfang = 0, the x axis (image columns) sees dfU and the y axis (rows) dfV."""
    dfu, dfv = 15000.0, 19000.0
    for s in _zero_radii(dfu):
        assert (
            abs(
                float(
                    cem.evaluate_ctf(torch.tensor(s, dtype=F64), torch.tensor(0.0, dtype=F64), dfu, dfv, 0.0)
                )
            )
            < 1e-9
        )
    for s in _zero_radii(dfv):
        assert (
            abs(
                float(
                    cem.evaluate_ctf(torch.tensor(0.0, dtype=F64), torch.tensor(s, dtype=F64), dfu, dfv, 0.0)
                )
            )
            < 1e-9
        )
    # dfang = 30 degrees: dfU now applies along the direction at 30 degrees from x towards y.
    a = math.radians(30.0)
    for s in _zero_radii(dfu):
        kx, ky = torch.tensor(s * math.cos(a), dtype=F64), torch.tensor(s * math.sin(a), dtype=F64)
        assert abs(float(cem.evaluate_ctf(kx, ky, dfu, dfv, 30.0))) < 1e-9


def test_astigmatism_angle_rotates_the_pattern():
    D, apix, dfu, dfv = 64, 1.2, 15000.0, 17000.0
    c0 = cem.ctf(D, apix, dfu, dfv, 0.0, dtype=F64)
    c90 = cem.ctf(D, apix, dfu, dfv, 90.0, dtype=F64)
    assert torch.allclose(c90, c0.T, atol=1e-12)  # x <-> y
    assert not torch.allclose(c0, c0.T, atol=1e-3)  # the pattern is really anisotropic
    # General angle: CTF_theta(k) = CTF_0(rotate(k, -theta)).
    theta = math.radians(37.0)
    kx, ky = cem.ctf_frequencies(D, apix)
    kxr = math.cos(theta) * kx + math.sin(theta) * ky
    kyr = -math.sin(theta) * kx + math.cos(theta) * ky
    assert torch.allclose(
        cem.ctf(D, apix, dfu, dfv, 37.0, dtype=F64), cem.evaluate_ctf(kxr, kyr, dfu, dfv, 0.0), atol=1e-10
    )


def test_bfactor_envelope():
    D, apix = 32, 1.5
    c = cem.ctf(D, apix, 15000.0, 15000.0, 0.0, dtype=F64)
    cb = cem.ctf(D, apix, 15000.0, 15000.0, 0.0, bfactor=80.0, dtype=F64)
    kx, ky = cem.ctf_frequencies(D, apix)
    assert torch.allclose(cb, c * torch.exp(-80.0 * (kx**2 + ky**2) / 4), atol=1e-14)


def test_matches_cryodrgn_formula_up_to_its_rounded_constants():
    """Transcript of cryoDRGN 4.x compute_ctf (constants 12.2639, 0.97845e-6)."""
    D, apix = 64, 1.0
    dfu, dfv, dfang, volt, cs, w = 16000.0, 15700.0, 123.0, 300.0, 2.7, 0.1
    kx, ky = cem.ctf_frequencies(D, apix)

    def cryodrgn(c1, c2):
        v = volt * 1000
        lam = c1 / (v + c2 * v**2) ** 0.5
        ang = torch.atan2(ky, kx)
        s2 = kx**2 + ky**2
        df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (ang - math.radians(dfang))))
        gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam**3 * s2**2)
        return (1 - w**2) ** 0.5 * torch.sin(gamma) - w * torch.cos(gamma)

    ours = cem.ctf(D, apix, dfu, dfv, dfang, volt, cs, w, dtype=F64)
    assert torch.allclose(ours, cryodrgn(12.2643247, 0.978466e-6), atol=1e-12)
    diff = (ours - cryodrgn(12.2639, 0.97845e-6)).abs().max()
    assert 1e-4 < diff < 2e-2  # the rounding is visible but small


def test_relion_getctf_is_minus_ours():
    """Transcript of RELION's CTF::getCTF/initialise: the same physics, opposite overall sign."""
    D, apix = 64, 1.1
    dfu, dfv, az, volt, cs, w, ps, B = 16000.0, 15400.0, 70.0, 300.0, 2.7, 0.1, 20.0, 30.0
    X, Y = cem.ctf_frequencies(D, apix)
    lam = 12.2643247 / math.sqrt(volt * 1e3 * (1.0 + volt * 1e3 * 0.978466e-6))
    K1, K2 = math.pi * lam, math.pi / 2 * cs * 1e7 * lam**3
    K3, K4, K5 = math.atan(w / math.sqrt(1 - w * w)), -B / 4.0, math.radians(ps)
    u2 = X * X + Y * Y
    deltaf = -(dfu + dfv) / 2 - (dfu - dfv) / 2 * torch.cos(2 * (torch.atan2(Y, X) - math.radians(az)))
    relion = -torch.sin(K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3) * torch.exp(K4 * u2)
    ours = cem.ctf(D, apix, dfu, dfv, az, volt, cs, w, phase_shift=ps, bfactor=B, dtype=F64)
    assert torch.allclose(ours, -relion, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(D=15, apix=1.0), ValueError, "even"),
        (dict(D=16, apix=0.0), ValueError, "apix"),
        (dict(D=16, apix=1.0, w=1.5), ValueError, "amplitude contrast"),
        (dict(D=16, apix=1.0, dfu=torch.zeros(3), dfv=torch.zeros(2)), ValueError, "broadcast"),
        (dict(D=16, apix=1.0, dfu="x"), TypeError, "dfu"),
    ],
)
def test_ctf_errors(kwargs, exc, match):
    args = dict(dfu=1e4, dfv=1e4, dfang=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        cem.ctf(**args)


# --------------------------------------------------------------------------- apply_ctf


def test_apply_ctf_identity_and_scaling():
    img = torch.randn(3, 16, 16, dtype=F64)
    ones = torch.ones(16, 16, dtype=F64)
    assert torch.allclose(cem.apply_ctf(img, ones), img, atol=1e-12)
    assert torch.allclose(cem.apply_ctf(img, -0.5 * torch.ones(32, 32, dtype=F64)), -0.5 * img, atol=1e-12)


def test_apply_ctf_is_centrosymmetric_about_the_centre_pixel():
    """The PSF of a real, even CTF is centrosymmetric; a centred delta must stay centred."""
    D = 16
    delta = torch.zeros(D, D, dtype=F64)
    delta[D // 2, D // 2] = 1.0
    for P in (D, 2 * D, 2 * D + 4):
        c = cem.ctf(P, 2.0, 15000.0, 14000.0, 20.0, dtype=F64)
        out = cem.apply_ctf(delta, c)
        # out[D/2 + a, D/2 + b] == out[D/2 - a, D/2 - b] for |a|, |b| < D/2
        inner = out[1:, 1:]
        assert torch.allclose(inner, torch.flip(inner, [0, 1]), atol=1e-12)
        if P == D:  # circular: the DC term is exactly CTF(0) = -w
            assert abs(float(out.sum()) + 0.1) < 1e-12


def test_apply_ctf_padding_reduces_wraparound():
    """Padded application equals linear convolution (huge canvas) better than circular."""
    D, apix = 32, 1.5
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(D, D, dtype=F64)
    img[4:12, 20:30] = torch.rand(8, 10, generator=g, dtype=F64)  # content near the edges
    params = (15000.0, 15000.0, 0.0)
    ref = cem.apply_ctf(img, cem.ctf(8 * D, apix, *params, dtype=F64))
    err_circ = (cem.apply_ctf(img, cem.ctf(D, apix, *params, dtype=F64)) - ref).norm()
    err_pad = (cem.apply_ctf(img, cem.ctf(2 * D, apix, *params, dtype=F64)) - ref).norm()
    assert err_pad < 0.5 * err_circ


def test_apply_ctf_is_differentiable():
    img = torch.randn(2, 4, 4, dtype=F64, requires_grad=True)
    c = cem.ctf(8, 2.0, torch.tensor([1e4, 2e4]), torch.tensor([1e4, 2e4]), 0.0, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: cem.apply_ctf(x, c), (img,))


def test_apply_ctf_errors():
    with pytest.raises(ValueError, match="at least the image size"):
        cem.apply_ctf(torch.zeros(16, 16), torch.ones(8, 8))
    with pytest.raises(ValueError, match="square"):
        cem.apply_ctf(torch.zeros(16, 8), torch.ones(16, 16))
    with pytest.raises(ValueError, match="even"):
        cem.apply_ctf(torch.zeros(15, 15), torch.ones(16, 16))
    with pytest.raises(TypeError, match="images"):
        cem.apply_ctf(torch.zeros(16, 16, dtype=torch.int64), torch.ones(16, 16))


# --------------------------------------------------------------------------- noise


def test_noise_hits_the_dataset_snr():
    g = torch.Generator().manual_seed(0)
    clean = (
        torch.randn(50, 32, 32, generator=g, dtype=F64) * torch.linspace(0.5, 2, 50, dtype=F64)[:, None, None]
    )
    noisy = cem.add_noise(clean, 0.1, generator=torch.Generator().manual_seed(1))
    noise = noisy - clean
    assert abs(float(clean.var(unbiased=False) / noise.var(unbiased=False)) - 0.1) < 0.003
    # One noise level for the whole data set.
    per_image_std = noise.std(dim=(1, 2))
    assert per_image_std.std() / per_image_std.mean() < 0.05
    # Seeded.
    assert torch.equal(noisy, cem.add_noise(clean, 0.1, generator=torch.Generator().manual_seed(1)))


def test_noise_per_image_snr():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(20, 64, 64, generator=g) * torch.linspace(0.5, 2, 20)[:, None, None]
    noise = cem.add_noise(clean, 2.0, generator=torch.Generator().manual_seed(1), per_image=True) - clean
    ratio = clean.var(dim=(1, 2), unbiased=False) / noise.var(dim=(1, 2), unbiased=False)
    assert torch.allclose(ratio, torch.full((20,), 2.0), rtol=0.1)
    sig = cem.noise_sigma(clean, 2.0, per_image=True)
    assert sig.shape == (20, 1, 1)


@pytest.mark.parametrize("snr", [0.0, -1.0, float("nan")])
def test_noise_bad_snr(snr):
    with pytest.raises(ValueError, match="snr"):
        cem.add_noise(torch.zeros(4, 4), snr)
