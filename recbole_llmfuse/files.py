"""File utilities every layer shares: nothing half-written (temp file or folder, then rename), the user's
umask kept, a folder's writability checked before hours of work depend on it."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from typing import Iterable, Iterator, Sequence

from recbole_llmfuse.errors import ConfigError


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the user's umask (``tempfile`` uses 0600 / 0700,
    which would make a shared data folder unreadable to colleagues)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temp_dir(parent: str, prefix: str) -> str:
    """A new temporary folder inside ``parent`` (to be renamed into place), with the umask's mode."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, umask_mode(directory=True))
    return path


def atomic_write(path: str, write) -> None:
    """Call ``write(binary_file)`` on a temp file beside ``path``, then rename it to ``path`` (no partial files;
    the file gets the umask's mode)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_csv(path: str, rows: Iterable[dict], fieldnames: Sequence[str], **options) -> None:
    """``rows`` (dicts) as a CSV with a header at ``path``, written atomically; ``options`` go to
    :class:`csv.DictWriter` (e.g. ``extrasaction="ignore"``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), **options)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def png_figure(path: str, dpi: int = 120, **subplots) -> Iterator[tuple]:
    """``with png_figure(path, figsize=(7, 4)) as (fig, ax): ...`` draws on ``plt.subplots(**subplots)`` and, when
    the block ends without error, writes the PNG atomically; the figure is closed either way. matplotlib's Agg
    backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(**subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def writable_dir(path: str, setting: str) -> str:
    """``path``, created if missing; a folder that cannot be made or written raises :class:`ConfigError` now,
    not after training (when the checkpoint is saved)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ConfigError(f"{setting} {path}: cannot write there ({err.strerror or err}); choose a writable folder, "
                          f"e.g. --{setting}=saved") from None
    return path
