"""Output files that survive crashes and report failures: writability checks, atomic writes.

A long run must not find out at its end that it cannot write its results, nor leave a
half-written file where a good one was: :func:`check_writable` is called before any work,
and :func:`write_atomic` / :func:`torch_save_atomic` write a temporary file next to the
target, flush it to disk and rename it over the target (``os.replace`` is atomic on POSIX),
so readers see the old file or the new one, never a truncated one. Any ``OSError`` (disk
full, permissions, quota) is raised again with the target path in the message and the
temporary file removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and make sure files can be written there.

    Call it before any training so a bad ``--out`` fails in seconds, not after an hour.
    Raises OSError with the path in the message.
    """
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"output directory {str(p)!r} is not writable: {exc.strerror or exc}") from exc
    return p


class OutputDirError(ValueError):
    """An output folder that already holds another run (see :func:`prepare_output_dir`)."""


def prepare_output_dir(out_dir: str | os.PathLike, outputs: tuple[str, ...], *, resume: bool = False,
                       overwrite: bool = False) -> Path:
    """The rule for an output folder, applied before any work (then :func:`check_writable`).

    * An empty or new folder is used as it is.
    * A folder holding anything else is refused (:class:`OutputDirError`) unless the run
      continues the one there (``resume``) or replaces it (``overwrite``): runs never mix.
    * ``overwrite`` first deletes what a run writes (``outputs``: glob patterns, folders
      included); other files are left alone.

    A resumed run deletes the old run's final results once it has loaded its checkpoint
    (:func:`remove_outputs`), so a folder's ``results.json`` (written last) always belongs to
    the files beside it. Returns the folder.
    """
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"output directory {str(p)!r} is a file")
    entries = sorted(e.name for e in p.iterdir()) if p.is_dir() else []
    if entries and not (resume or overwrite):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"output directory {str(p)!r} is not empty ({shown}): pass --resume to continue the run there, "
            "--overwrite to replace it, or choose another --out"
        )
    if overwrite:
        remove_outputs(p, outputs)
    return check_writable(p)


def remove_outputs(out_dir: str | os.PathLike, patterns: tuple[str, ...]) -> None:
    """Delete what matches the glob ``patterns`` in ``out_dir`` (files and folders); OSError
    names the path."""
    import shutil

    for pattern in patterns:
        for path in Path(out_dir).glob(pattern):
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:
                raise OSError(exc.errno, f"could not remove {str(path)!r}: {exc.strerror or exc}") from exc


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; OSError names the path."""
    payload = data.encode() if isinstance(data, str) else data
    return _atomic(Path(path), lambda f: f.write(payload))


def save_figure_atomic(fig, path: str | os.PathLike, **savefig) -> Path:
    """A matplotlib figure rendered in memory, then :func:`write_atomic` (OSError names the
    path: matplotlib's own errors say only ``[Errno 28]``)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_atomic(path, buffer.getvalue())


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; OSError names the path."""
    import torch

    return _atomic(Path(path), lambda f: torch.save(obj, f))
