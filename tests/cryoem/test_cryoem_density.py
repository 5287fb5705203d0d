"""Density maps from the packaged PDB structures (gemmi)."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fieldkern.cryoem as cem

pytest.importorskip("gemmi")  # the cryoem extra

F64 = torch.float64


def test_packaged_structures_and_provenance():
    for name in ("4ake", "1ol5", "4AKE"):
        p = cem.structure_path(name)
        assert p.is_file() and p.suffix == ".pdb"
    readme = cem.structure_path("1ol5").parent / "README.md"
    assert "provenance" in readme.read_text().lower()
    with pytest.raises(ValueError, match="unknown structure"):
        cem.structure_path("1abc")
    with pytest.raises(FileNotFoundError, match="not found"):
        cem.density_from_structure("/nonexistent/x.pdb", 32, 3.0)


def test_elements_are_read_correctly():
    # 1OL5 has element columns: C, N, O, S and no hydrogens.
    _, z = cem.load_atoms("1ol5")
    assert len(z) == 2277 and dict(zip(*np.unique(z, return_counts=True))) == {6: 1464, 7: 397, 8: 410, 16: 6}
    # 4AKE (CHARMM, no element columns): 'CA' is carbon, not calcium; 'HG1' is hydrogen, not mercury.
    _, z = cem.load_atoms("4ake", hydrogens=True)
    assert len(z) == 3341 and set(z.tolist()) == {1, 6, 7, 8, 16}
    assert int((z == 16).sum()) == 7  # 6 Met SD + 1 Cys SG
    _, z_heavy = cem.load_atoms("4ake")
    assert len(z_heavy) == 3341 - int((z == 1).sum())


def test_density_mass_centre_and_speed():
    D, apix = 64, 1.5
    t0 = time.perf_counter()
    v = cem.density_from_structure("4ake", D, apix, hydrogens=True)  # all 3341 atoms
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0  # ~0.5 s on 2 cores
    assert v.shape == (D, D, D) and v.dtype == torch.float32 and (v >= 0).all()
    _, z = cem.load_atoms("4ake", hydrogens=True)
    # electrons / A^3 integrated over the box gives the total atomic number
    assert float(v.double().sum()) * apix**3 == pytest.approx(float(z.sum()), rel=1e-5)
    idx = torch.arange(D, dtype=F64) - D // 2
    m = v.double()
    com = [float((m.sum(dim) * idx).sum() / m.sum()) for dim in ((0, 1), (0, 2), (1, 2))]  # x, y, z
    assert max(abs(c) for c in com) < 0.01  # Z-weighted centre at voxel D//2


def test_gaussian_width_follows_resolution(tmp_path: Path):
    """One carbon atom: per-axis variance = sigma^2 + apix^2/12 (voxel integration), sigma = 0.225 res."""
    pdb = tmp_path / "one.pdb"
    pdb.write_text("ATOM      1  C   ALA A   1       0.300  -0.200   0.100  1.00  0.00           C\nEND\n")
    D, apix = 32, 1.0
    for res in (3.0, 6.0):
        v = cem.density_from_structure(pdb, D, apix, resolution=res, center=(0.0, 0.0, 0.0), dtype=F64)
        idx = torch.arange(D, dtype=F64) - D // 2
        px = v.sum((0, 1)) / v.sum()
        mean = float((px * idx).sum()) * apix
        var = float((px * idx**2).sum()) * apix**2 - mean**2
        sigma = res / (math.pi * math.sqrt(2))
        assert mean == pytest.approx(0.3, abs=1e-3)  # exact up to sampling of a narrow Gaussian
        assert var == pytest.approx(sigma**2 + apix**2 / 12, rel=0.02)
        assert float(v.sum()) * apix**3 == pytest.approx(6.0, rel=1e-9)
    # A B-factor widens it: sigma^2 += B / (8 pi^2).
    vb = cem.density_from_structure(pdb, D, apix, resolution=3.0, bfactor=40.0, center=(0, 0, 0), dtype=F64)
    px = vb.sum((0, 1)) / vb.sum()
    var = float((px * idx**2).sum()) - float((px * idx).sum()) ** 2
    assert var == pytest.approx(
        (3.0 / (math.pi * math.sqrt(2))) ** 2 + 40 / (8 * math.pi**2) + 1 / 12, rel=0.02
    )


def test_mmcif_gives_the_same_map(tmp_path: Path):
    import gemmi

    st = gemmi.read_structure(str(cem.structure_path("1ol5")))
    st.setup_entities()
    cif = tmp_path / "1ol5.cif"
    st.make_mmcif_document().write_file(str(cif))
    a = cem.density_from_structure("1ol5", 32, 3.0)
    b = cem.density_from_structure(cif, 32, 3.0)
    assert torch.allclose(a, b, atol=1e-6)


def test_structure_must_fit_in_the_box():
    with pytest.raises(ValueError, match="does not fit in the box"):
        cem.density_from_structure("4ake", 32, 1.5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(box=33, apix=3.0), ValueError, "even"),
        (dict(box=32, apix=-1.0), ValueError, "apix"),
        (dict(box=32, apix=3.0, resolution=0.0), ValueError, "resolution"),
        (dict(box=32, apix=3.0, bfactor=-5.0), ValueError, "bfactor"),
        (dict(box=32.0, apix=3.0), TypeError, "box"),
    ],
)
def test_density_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cem.density_from_structure("1ol5", **kwargs)


def test_coordinates_that_do_not_parse_are_refused_with_file_and_line(tmp_path):
    """gemmi read ``abc.def`` in a PDB x field as 0, and the error then blamed the box."""
    import gemmi

    lines = cem.structure_path("1ol5").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("ATOM  "))
    bad = list(lines)
    bad[first + 2] = bad[first + 2][:30] + " abc.def" + bad[first + 2][38:]
    (tmp_path / "bad.pdb").write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.pdb, line {first + 3}: the x coordinate 'abc.def' \(columns 31-38\)"):
        cem.load_atoms(tmp_path / "bad.pdb")
    # mmCIF: the same atom written by gemmi, its y coordinate broken
    st = gemmi.read_structure(str(cem.structure_path("1ol5")))
    st.setup_entities()
    cif = st.make_mmcif_document().as_string().splitlines()
    row = next(i for i, line in enumerate(cif) if line.startswith("ATOM"))
    fields = cif[row].split()
    fields[11] = "12.x4"  # Cartn_y
    cif[row] = " ".join(fields)
    (tmp_path / "bad.cif").write_text("\n".join(cif) + "\n")
    with pytest.raises(ValueError, match=r"bad\.cif: the y coordinate '12\.x4' of atom_site row 1"):
        cem.load_atoms(tmp_path / "bad.cif")
    cem.load_atoms(cem.structure_path("1ol5"))  # the intact file reads
