"""Reading and writing the user's files safely (standard library only, so it costs nothing at start-up).

- `open_regular`: opens a file for reading without ever blocking on a FIFO or a device, and refuses
  anything that is not a regular file.
- `read_text_file`: a small text file the user named (a class list, a token), or one line saying why not.
- `is_image_file`: whether a path names an image, by its extension (the image files of input folders).
- `check_output_path`: everything about an output path that can be known before work starts (not a
  folder, not an input, its folder exists and is writable), so a bad `-o` fails in a second, not
  after training.
- `claim_output`: an advisory lock beside the output, so that a second command writing the same file
  fails at its start instead of both training and one overwriting the other.
- `checked_output`: both, as the commands use them for every file they write.
- `atomic_write`: temp file + fsync + rename with the permissions a normal write would give; OS
  errors become one line naming the user's path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import AdaclipError, InputError, UsageError

LOCK_SUFFIX = ".lock"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Errors that mean "this path cannot be written": the user can fix them by choosing another (exit 2).
# The rest (no space, I/O error, quota) are runtime failures (exit 1).
_PATH_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ENOENT}


def os_error(exc: OSError, action: str, path: str | Path) -> AdaclipError:
    """One line naming the user's path (never a temporary file's) and what went wrong."""
    reason = exc.strerror or str(exc)
    error_type = UsageError if exc.errno in _PATH_ERRORS else AdaclipError
    return error_type(f"cannot {action} ({reason})", path=path)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path):
    """A binary file object for a regular file. Opening is non-blocking, so a FIFO or a device cannot
    make us wait; anything but a regular file raises IsADirectoryError / `NotRegularFileError`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text_file(path: str | Path, what: str, error: type[AdaclipError] = InputError) -> str:
    """The UTF-8 text of a file the user named as an option value; `what` names it in the one-line
    `error` (exit 2) when it is missing, not a regular file (a FIFO would block), unreadable or not text."""
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise error(f"{what} not found", path=path) from None
    except NotRegularFileError as exc:
        raise error(f"{what} is {exc.kind}, not a regular file", path=path) from None
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or exc})", path=path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})", path=path) from None


class NotRegularFileError(OSError):
    def __init__(self, path: str | Path, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def check_output_path(
    path: str | Path,
    *,
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    what: str = "output file",
    option: str = "-o",
) -> Path:
    """Refuse, before any work, an output that cannot or must not be written: an existing file without
    `force`, a folder, one of the `inputs` (files, or images inside input folders), a missing folder,
    or a folder that does not take new files (read-only, no permission). A small probe file proves the
    last one, which also covers read-only mounts and root's exemption from permission bits. `what` and
    `option` name the output in messages (e.g. "log file", "--log-jsonl")."""
    path = Path(path)
    if path.is_dir():
        raise UsageError("output path is a folder", path=path, fix="give a file name, e.g. -o pets.adaclip")
    if path.exists() or path.is_symlink():
        if not force:
            raise UsageError(f"{what} already exists", path=path, fix=f"choose another {option} or pass --force")
        if not path.is_file():
            raise UsageError("output path exists and is not a regular file", path=path)
    real = _resolved(path)
    for source in inputs:
        source_real = _resolved(Path(source))
        if real == source_real:
            raise UsageError("output path is one of the inputs", path=path, fix="write the output elsewhere")
        if Path(source).is_dir() and is_image_file(real) and real.is_relative_to(source_real):
            raise UsageError("output path is an image inside the input folder", path=path, fix="write it elsewhere")
    parent = path.parent
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"output folder {problem}", path=parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise os_error(exc, "write to the output folder", parent) from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def checked_output(
    path: str | Path | None,
    *,
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    what: str = "output file",
    option: str = "-o",
    lock: bool = True,
) -> Iterator[Path | None]:
    """The check a command runs on each file it will write, before any work: `check_output_path`,
    then, with `lock`, `claim_output` until the block ends. No path (the option not given): nothing."""
    if path is None:
        yield None
        return
    path = check_output_path(path, force=force, inputs=inputs, what=what, option=option)
    if not lock:
        yield path
        return
    with claim_output(path):
        yield path


@contextlib.contextmanager
def claim_output(path: str | Path) -> Iterator[Path]:
    """Hold an advisory lock (`PATH.lock`, flock) while a command produces `path`; a second claim of
    the same path fails at once with a one-line error. The lock file is removed on exit."""
    import fcntl

    path = Path(path)
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise os_error(exc, "create the lock file", lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                "another adaclip command is writing this output",
                path=path,
                fix=f"wait for it, or choose another -o (lock: {lock_path.name})",
            ) from None
        # The holder before us may have removed the file between our open and flock: then our lock is
        # on an orphaned inode, and we try again on the path as it is now.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _new_file_mode(path: Path) -> int:
    """What open(path, "w") would give: an existing file's mode, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, sync, then rename over `path`: readers see the old
    file or the new one, never a partial one, and a failed or interrupted write leaves nothing behind."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    try:
        try:
            os.fchmod(fd, _new_file_mode(path))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(exc, "write", path) from None
        raise
    return path
