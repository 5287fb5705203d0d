"""Each Table 2 method, trained by the real image trainer, freezes what it should."""

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from fieldkern import grid_coordinates  # noqa: E402
from fieldkern.image import METHODS, SAPE, ImagePreset, fit_image  # noqa: E402
from fieldkern.train import Callback  # noqa: E402

# Switches at 1, 2, 4: stage 2 runs steps 2 and 3.
PRESET = ImagePreset("test", hidden=8, n_scales=4, iterations=20, train_size=16, eval_size=16,
                     sape_frequencies=8)


def _image(channels=3):
    rng = np.random.default_rng(0)
    return rng.random((16, 16, channels)).astype(np.float32)


def _groups(model):
    """Parameter tensors by role: filter i (phases), linear i (A_i feeding layer i), head k."""
    out = {}
    for i, f in enumerate(model.filters):
        out[f"filter{i}"] = [p for p in f.parameters()]
    for i, lin in enumerate(model.linears, start=1):
        out[f"linear{i}"] = list(lin.parameters())
    for k, h in enumerate(model.heads):
        out[f"head{k}"] = list(h.parameters())
    return out


class StageWatch(Callback):
    """Copies the parameters when ``stage`` starts and compares when it ends."""

    def __init__(self, model, stage):
        self.model, self.stage = model, stage
        self.changed, self.trainable = {}, {}

    def on_stage_start(self, stage, step):
        if stage == self.stage:
            self.before = {k: [p.detach().clone() for p in ps] for k, ps in _groups(self.model).items()}

    def on_stage_end(self, stage, step):
        if stage == self.stage:
            for k, ps in _groups(self.model).items():
                self.changed[k] = any(not torch.equal(p, b) for p, b in zip(ps, self.before[k]))
                self.trainable[k] = all(p.requires_grad for p in ps)


def _trainable_in_stage2(name):
    trunk = {"filter0", "filter1", "filter2", "linear1", "linear2"}
    heads = {"head2"} if name == "staged_bacon_unfair" else {"head0", "head1", "head2"}
    return trunk | heads


@pytest.mark.parametrize("name", ["staged_bacon_unfair", "staged_bacon_fair", "staged_res_bacon_init",
                                  "staged_res_new_init"])
def test_staged_methods_train_exactly_their_stage(name):
    method = METHODS[name]
    model = method.build(3, PRESET)
    watch = StageWatch(model, stage=2)
    result = fit_image(method, _image(), PRESET, model=model, callbacks=[watch], progress=False)
    expected = _trainable_in_stage2(name)
    assert set(watch.changed) == {f"filter{i}" for i in range(4)} | {f"linear{i}" for i in (1, 2, 3)} | {
        f"head{k}" for k in range(4)}
    assert {k for k, v in watch.changed.items() if v} == expected
    assert {k for k, v in watch.trainable.items() if v} == expected
    # The snapshots are the scales' outputs on the training grid.
    assert [a.shape for a in result.stage_outputs] == [(16, 16, 3)] * 3


def _outputs(model):
    """Every output the model returns on PRESET's 16 x 16 grid, ``(16, 16, C)`` numpy arrays."""
    with torch.no_grad():
        return [o.reshape(16, 16, -1).numpy() for o in model(grid_coordinates((16, 16)).reshape(-1, 2))]


class StageEndOutputs(Callback):
    """The last output (scale ``stage``) when each stage ends, before the model switches."""

    def __init__(self, model):
        self.model, self.outputs = model, {}

    def on_stage_end(self, stage, step):
        self.outputs[stage] = _outputs(self.model)[-1]


def _spectrum_mad(before, after):
    """Table 2's MAD written out: mean over channels and frequencies of | |FFT2| - |FFT2| |,
    orthonormal FFT of the intensities in grey levels (times 255)."""
    def spectrum(a):
        return np.abs(np.fft.fft2(255.0 * a.astype(np.float64), axes=(0, 1), norm="ortho"))
    return float(np.mean(np.abs(spectrum(before) - spectrum(after))))


@pytest.mark.parametrize("name", ["staged_bacon_unfair", "staged_bacon_fair", "staged_res_bacon_init",
                                  "staged_res_new_init"])
def test_staged_methods_score_mad_and_psnr_from_their_outputs(name):
    method = METHODS[name]
    model = method.build(3, PRESET)
    ends = StageEndOutputs(model)
    image = _image()
    result = fit_image(method, image, PRESET, model=model, callbacks=[ends], progress=False)
    final = _outputs(model)  # fit_image leaves every scale active
    assert len(result.mad) == len(result.stage_outputs) == len(result.final_train_outputs) == 3
    for s in range(3):
        # The exposed outputs are scale s at the end of its stage and after all training ...
        np.testing.assert_allclose(result.stage_outputs[s], ends.outputs[s], rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.final_train_outputs[s], final[s], rtol=0, atol=1e-6)
        # ... which differ (training later stages moves earlier scales in all four methods) ...
        assert np.abs(ends.outputs[s] - final[s]).max() > 1e-3
        # ... and the MAD is the spectrum change between them.
        assert result.mad[s] == pytest.approx(_spectrum_mad(ends.outputs[s], final[s]), rel=1e-9)
        assert result.mad[s] > 0.01
    # PSNR of the final scale, unclipped; PRESET trains at the evaluation size, where the
    # Lanczos resize keeps the image as it is, so both resolutions score the same.
    expected_psnr = -10 * np.log10(np.mean((final[-1].astype(np.float64) - image) ** 2))
    assert result.psnr == pytest.approx(expected_psnr, rel=1e-6)
    assert result.psnr_train == pytest.approx(expected_psnr, rel=1e-6)


def test_training_ends_with_all_scales_active_and_trainable():
    # After training, set_stage(None) leaves everything trainable again for the user.
    method = METHODS["staged_res_new_init"]
    model = method.build(1, PRESET)
    fit_image(method, _image(1), PRESET, model=model, progress=False)
    assert model.stage is None and all(p.requires_grad for p in model.parameters())


def test_vanilla_bacon_trains_everything_at_once():
    method = METHODS["bacon"]
    model = method.build(3, PRESET)
    before = {k: [p.detach().clone() for p in ps] for k, ps in _groups(model).items()}
    watch = StageWatch(model, stage=0)  # vanilla: stage callbacks never fire
    result = fit_image(method, _image(), PRESET, model=model, callbacks=[watch], progress=False)
    assert watch.changed == {}
    assert all(not torch.equal(p, b) for k, ps in _groups(model).items() for p, b in zip(ps, before[k]))
    assert result.mad is None and len(result.eval_outputs) == 4


def test_sape_progress_advances_only_where_error_is_high():
    model = SAPE(2, 8, 1, resolution=4, n_frequencies=10, threshold=0.1, progress_steps=10, start_fraction=0.2)
    err = torch.zeros(4, 4)
    err[0, :] = 1.0
    model.update_progress(err)
    assert torch.allclose(model.alpha[0], torch.full((4,), 0.3))
    assert torch.allclose(model.alpha[1:], torch.full((3, 4), 0.2))
    for _ in range(20):
        model.update_progress(err)
    assert torch.allclose(model.alpha[0], torch.ones(4))  # saturates at 1


def test_sape_mask_at_pixel_centres_and_frequency_order():
    model = SAPE(2, 8, 1, resolution=4, n_frequencies=10, start_fraction=0.25)
    model.alpha[2, 1] = 0.55
    x = grid_coordinates((4, 4))
    np.testing.assert_allclose(model.progress(x).numpy(), model.alpha.numpy(), atol=1e-6)
    m = model.mask(x)
    # alpha 0.25 of 10 frequencies: 2.5 on -> weights 1, 1, 0.5, 0, ...
    np.testing.assert_allclose(m[0, 0, :4].numpy(), [1, 1, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(m[2, 1, :7].numpy(), [1, 1, 1, 1, 1, 0.5, 0], atol=1e-6)
    norms = model.frequencies.norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1])


def test_sape_fits_through_the_trainer_and_advances():
    method = METHODS["sape"]
    model = method.build(3, PRESET)
    start = model.alpha.clone()
    result = fit_image(method, _image(), PRESET, model=model, progress=False)
    assert torch.all(model.alpha >= start) and torch.any(model.alpha > start)
    assert result.losses[-1] < result.losses[0]


def test_presets_and_lookup_errors():
    from fieldkern.image import IMAGE_PRESETS, get_method, image_preset

    paper = IMAGE_PRESETS["paper"]
    assert (paper.hidden, paper.n_scales, paper.iterations, paper.lr) == (256, 4, 10000, 5e-3)
    assert (paper.train_size, paper.eval_size) == (256, 512)
    with pytest.raises(ValueError, match="stage fractions"):
        ImagePreset("bad", hidden=8, n_scales=3, iterations=10, train_size=16, eval_size=32)
    with pytest.raises(ValueError, match="unknown method 'nerf'"):
        get_method("nerf")
    with pytest.raises(ValueError, match="unknown preset"):
        image_preset("huge")


def test_fit_image_rejects_8bit_range_and_nan_before_training():
    method = METHODS["sape"]
    with pytest.raises(ValueError, match=r"image values must lie in \[0, 1\].*divide 8-bit images by 255"):
        fit_image(method, _image() * 255, PRESET, progress=False)
    nan = _image()
    nan[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="image holds NaN"):
        fit_image(method, nan, PRESET, progress=False)


def test_fit_image_reads_grey_hw_as_one_channel():
    method = METHODS["sape"]
    grey = _image(1)
    flat = fit_image(method, grey[..., 0], PRESET, progress=False)
    ref = fit_image(method, grey, PRESET, progress=False)
    assert flat.eval_outputs[-1].shape == (16, 16, 1)
    assert flat.psnr == ref.psnr and flat.psnr_train == ref.psnr_train
    with pytest.raises(ValueError, match=r"channels last.*\(3, 16, 16\)"):
        fit_image(method, torch.from_numpy(_image()).permute(2, 0, 1), PRESET, progress=False)


def test_fit_image_names_the_run_whose_outputs_are_not_finite():
    class Poison(Callback):
        def __init__(self, model):
            self.model = model

        def on_train_end(self, n_steps):
            with torch.no_grad():
                self.model.mlp[-1].bias.fill_(float("nan"))

    method = METHODS["sape"]
    model = method.build(3, PRESET)
    with pytest.raises(FloatingPointError, match="sape on poisoned: .* not finite"):
        fit_image(method, _image(), PRESET, model=model, callbacks=[Poison(model)], image_name="poisoned",
                  progress=False)


def test_sape_checks_resolution_and_progress_steps():
    with pytest.raises(ValueError, match="resolution must be a positive int, got 0"):
        SAPE(2, 8, 1, resolution=0)
    with pytest.raises(ValueError, match="progress_steps must be a positive int, got 0"):
        SAPE(2, 8, 1, resolution=4, progress_steps=0)


def test_preset_stores_numpy_integers_as_int_and_rejects_bad_counts():
    p = ImagePreset("np", hidden=np.int64(8), n_scales=np.int64(4), iterations=np.int64(20),
                    train_size=np.int64(16), eval_size=np.int64(16), sape_frequencies=np.int64(8))
    fields = (p.hidden, p.n_scales, p.iterations, p.train_size, p.eval_size, p.sape_frequencies)
    assert fields == (8, 4, 20, 16, 16, 8) and all(type(v) is int for v in fields)
    with pytest.raises(ValueError, match="preset 'bad': hidden must be a positive int, got 0"):
        ImagePreset("bad", hidden=0, n_scales=4, iterations=20, train_size=16, eval_size=16)
    with pytest.raises(ValueError, match="preset 'bad': iterations must be a positive int, got 20.0"):
        ImagePreset("bad", hidden=8, n_scales=4, iterations=20.0, train_size=16, eval_size=16)


def test_figures_draw_a_grey_hw_image_in_grey(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from fieldkern.image import figures

    cmaps = []
    original = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, img, **kw: cmaps.append(kw.get("cmap")) or original(ax, img, **kw))
    method = METHODS["sape"]
    grey = _image(1)[..., 0]
    result = fit_image(method, grey, PRESET, progress=False)
    figures.write_figures(tmp_path, [[result]], [method], [grey], PRESET)
    assert cmaps and set(cmaps) == {"gray"}
