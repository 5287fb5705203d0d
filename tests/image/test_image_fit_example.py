"""Smoke and bad-input tests of examples/image_fit.py."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from fieldkern.image import METHODS  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "image_fit.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("image_fit_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_results_table_and_figures(example, tmp_path, capsys):
    out = tmp_path / "run"
    assert example.main(["--preset", "tiny", "--dataset", "text", "--n-images", "2", "--out", str(out),
                         "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"settings", "methods"}
    assert summary["settings"]["preset"]["name"] == "tiny" and summary["settings"]["n_images"] == 2
    assert "--preset tiny" in summary["settings"]["command"]
    assert list(summary["methods"]) == list(METHODS)
    for name, entry in summary["methods"].items():
        assert set(entry["psnr"]) == {"mean", "std"} and np.isfinite(entry["psnr"]["mean"])
        assert len(entry["per_image"]) == 2
        if METHODS[name].staged:
            assert len(entry["mad"]) == 3 and all(set(m) == {"mean", "std"} for m in entry["mad"])
            assert len(entry["per_image"][0]["mad"]) == 3
        else:
            assert entry["mad"] is None
    # The summary is the population mean and std (ddof 0) of the per-image values beside it.
    for name, entry in summary["methods"].items():
        per_image = entry["per_image"]
        for key in ("psnr", "psnr_train", "seconds"):
            values = [p[key] for p in per_image]
            assert entry[key] == pytest.approx({"mean": np.mean(values), "std": np.std(values)}), (name, key)
        if METHODS[name].staged:
            for s, ms in enumerate(entry["mad"]):
                values = [p["mad"][s] for p in per_image]
                assert all(v > 0 for v in values), (name, s)  # later stages move every earlier scale
                assert ms == pytest.approx({"mean": np.mean(values), "std": np.std(values)}), (name, s)
    table = (out / "results.md").read_text()
    # Table 2's rows show those means and stds.
    for entry in summary["methods"].values():
        cells = [f"{ms['mean']:.2f} ± {ms['std']:.2f}" for ms in entry["mad"] or []] or ["-"] * 3
        psnr = f"{entry['psnr']['mean']:.2f} ± {entry['psnr']['std']:.2f}"
        assert "| " + " | ".join([entry["label"], *cells, psnr]) + " |" in table
    assert "| Method | MAD scale 1 | MAD scale 2 | MAD scale 3 | PSNR (dB) scale 4 |" in table
    for method in METHODS.values():
        assert f"| {method.label} |" in table
    assert "| SAPE | - | - | - |" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6  # scales, spectra, reconstructions for each of 2 images
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.verify()
    assert "MAD scale 1" in capsys.readouterr().out


def test_user_grey_image_of_any_size(example, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8), "L").save(tmp_path / "grey.png")
    out = tmp_path / "run"
    assert example.main(["--preset", "tiny", "--image", str(tmp_path / "grey.png"), "--methods", "sape",
                         "staged_res_new_init", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == ["sape", "staged_res_new_init"]
    assert summary["settings"]["images"] == ["grey"]


def _assert_failed_cleanly(rc, err, out):
    assert rc != 0
    assert "error" in err
    assert not (out / "results.json").exists() and not (out / "results.md").exists()


def test_unreadable_image(example, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    out = tmp_path / "run"
    rc = example.main(["--preset", "tiny", "--image", str(bad), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    _assert_failed_cleanly(rc, err, out)
    assert "cannot read image" in err and "bad.png" in err


def test_output_dir_not_writable(example, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "sub"  # cannot create a folder under a file (holds even for root)
    rc = example.main(["--preset", "tiny", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "not writable" in err and str(out) in err


def test_unknown_method_exits_non_zero_via_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--methods", "bacon", "nerf", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "unknown method(s) nerf" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(example, tmp_path, capsys):
    out = tmp_path / "run"
    rc = example.main(["--preset", "tiny", "--device", "cuda", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    _assert_failed_cleanly(rc, err, out)
    assert "CUDA is not available" in err


def test_image_smaller_than_the_evaluation_size_is_refused(example, tmp_path, capsys):
    Image.fromarray(np.zeros((20, 40), np.uint8), "L").save(tmp_path / "small.png")
    out = tmp_path / "run"
    rc = example.main(["--preset", "tiny", "--image", str(tmp_path / "small.png"), "--methods", "sape",
                       "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    _assert_failed_cleanly(rc, err, out)
    assert "evaluates at 32x32" in err and "small (20x40)" in err and "not upsampled" in err


def test_more_images_asked_for_than_the_folder_holds(example, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8), "L").save(folder / "only.png")
    out = tmp_path / "run"
    rc = example.main(["--preset", "tiny", "--image", str(folder), "--n-images", "3", "--methods", "sape",
                       "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    _assert_failed_cleanly(rc, err, out)
    assert f"--n-images 3: {folder} holds only 1 image(s)" in err


def test_a_folder_holding_results_is_refused_without_overwrite(example, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--dataset", "text", "--n-images", "1", "--methods", "sape", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    assert example.main(args) == 0
    before = (out / "results.json").read_text()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert example.main(args) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    stale = out / "scales_old.png"
    stale.write_bytes(b"from an earlier run")
    assert example.main([*args, "--overwrite"]) == 0
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "results.json").is_file()


def test_a_figure_that_cannot_be_written_names_its_path(tmp_path, monkeypatch):
    """Disk full while saving a figure said only "[Errno 28]"."""
    import errno
    import os

    import matplotlib.pyplot as plt

    from fieldkern._files import save_figure_atomic

    def full(fd, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    fig = plt.figure()
    with pytest.raises(OSError, match=r"could not write .*scales_a\.png.*No space left on device") as info:
        save_figure_atomic(fig, tmp_path / "scales_a.png")
    plt.close(fig)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
