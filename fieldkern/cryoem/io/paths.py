"""Files named by the user or by a STAR file: existence checks and particle-stack lookup."""

from __future__ import annotations

from pathlib import Path


def check_is_file(path: Path, what: str) -> None:
    """FileNotFoundError for a missing path, IsADirectoryError for a folder (both name it)."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")


def resolve_stack(file: str, star_dir: Path, data_dir: Path | None) -> Path:
    """The MRC stack a STAR ``rlnImageName`` names: absolute as given; relative to
    ``data_dir`` if given, else to ``star_dir`` and then the current directory.

    Raises FileNotFoundError listing the paths tried.
    """
    p = Path(file)
    if p.is_absolute():
        cands = [p]
    elif data_dir is not None:
        cands = [data_dir / p]
    else:
        # RELION resolves relative to its project directory (the cwd of the job); STAR
        # files moved with their stacks resolve relative to their own folder. Try both.
        cands = [star_dir / p, Path.cwd() / p]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"particle stack {file!r} not found (tried {', '.join(map(str, cands))})")
