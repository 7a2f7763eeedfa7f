"""Path checks shared by the commands: names that are not UTF-8, outputs that cannot be written
(checked before the long work starts), and write failures (disk full, read-only) turned into one
clear error. `llmprune.checkpoint.check_output_dir` still decides what an existing output may be."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import LLMPruneError

# errno values that mean "this location cannot take the files", not a bug of ours.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "file too large")


def printable(text) -> str:
    """`text` safe to print on a UTF-8 stream: undecodable bytes of a file name (lone surrogates
    from os.fsdecode) become visible escapes like \\udcff instead of an encoding error."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8_path(path, what: str) -> None:
    """Refuse a path whose name holds bytes that are not UTF-8: the tokenizer and ONNX Runtime
    libraries cannot open such paths."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LLMPruneError(
            f"{what} '{printable(path)}' has a name that is not valid UTF-8",
            "rename it (or make a symbolic link to it) with a UTF-8 name",
        ) from exc


def special_file_kind(path: Path) -> str | None:
    """'a character device', 'a FIFO (named pipe)', ... when `path` exists but is neither a
    regular file nor a folder; None otherwise (missing, file or folder)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_writable_output(out, flag: str = "--out") -> None:
    """Fail fast, before any long work, when the output folder `out` could not be created there:
    a name that is not UTF-8, a path under an existing file, a read-only or special file system
    (/proc). Writes nothing (a probe folder is made and removed at once)."""
    check_utf8_path(out, flag)
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        probe_in = out.parent if out.parent != out else out
    else:
        kind = special_file_kind(out)
        if kind:
            raise LLMPruneError(f"{flag} '{printable(out)}' is {kind}", f"choose a folder path for {flag}")
        probe_in = out.parent
    while not os.path.lexists(probe_in) and probe_in.parent != probe_in:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise LLMPruneError(f"{flag} '{printable(out)}' is inside '{printable(probe_in)}', which is a file, not a folder",
                            f"choose a {flag} that is not under a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmprune-probe-", dir=probe_in))
    except OSError as exc:
        raise LLMPruneError(
            f"{flag} '{printable(out)}' cannot be written ({printable(probe_in)}: {exc.strerror or exc})",
            f"choose a writable folder for {flag}",
        ) from exc


def find_write_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc` (itself, its cause or context) when it is a failure to write a
    file — disk full, read-only, permissions — else None. Libraries that write from C++ raise
    their own types with the system message; those count when the message says the disk is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        text = str(exc).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(out, exc: OSError, flag: str = "--out") -> LLMPruneError:
    """One line for a failed write into `out` (nothing was kept: outputs are written atomically)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return LLMPruneError(
            f"no space left on the device while writing {flag} '{printable(out)}' ({exc.strerror or exc}); nothing was written",
            f"free disk space, or choose a {flag} on a disk with more room",
        )
    return LLMPruneError(
        f"could not write {flag} '{printable(out)}' ({exc.strerror or exc}); nothing was written",
        f"check that the folder is writable and has free space, or choose another {flag}",
    )
