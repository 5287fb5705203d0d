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


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; OSError names the path."""
    import torch

    return _atomic(Path(path), lambda f: torch.save(obj, f))
