"""Paths given by users, and writes that never leave a half-written file.

Every file the package writes (compressed models, peft adapters, benchmark
JSON and plots) goes through :func:`atomic_write_files`: to a temporary file
beside the target, synced, then renamed over it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from ._names import owner_prefix


def check_path(owner, path, what="path"):
    """``path`` as a str; a TypeError naming ``what`` for anything that is not a path."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{owner_prefix(owner)}{what} must be a str or os.PathLike, "
                        f"got {type(path).__name__}")
    path = os.fsdecode(path)
    if not path:
        kind = "directory" if what == "directory" else "file"
        raise ValueError(f"{owner_prefix(owner)}{what} is empty; give a {kind} name")
    if "\0" in path:
        raise ValueError(f"{owner_prefix(owner)}{what} contains a NUL character: {path!r}")
    return path


def check_input_file(owner, path):
    """FileNotFoundError / IsADirectoryError unless ``path`` is an existing
    file, PermissionError (an OSError naming the path) where it cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{owner_prefix(owner)}no such file: {path}") from None
    except OSError as exc:  # a directory on the way that may not be searched, ...
        raise type(exc)(exc.errno, f"{owner_prefix(owner)}cannot read {path}: "
                        f"{exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{owner_prefix(owner)}{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise FileNotFoundError(f"{owner_prefix(owner)}no such file: {path} (it is not a "
                                "regular file)")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise type(exc)(exc.errno, f"{owner_prefix(owner)}cannot read {path}: "
                        f"{exc.strerror or exc}") from None
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        # safetensors takes the name as UTF-8 text and would call the file
        # invalid.
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # the bytes, escaped
        raise ValueError(f"{owner_prefix(owner)}cannot read {shown}: safetensors opens only files "
                         "whose path is valid UTF-8; rename the file or link it under such a "
                         "name") from None


def check_output_path(owner, path, *, force=True, flag="--force", what="path",
                      replaced=True):
    """Fail early, before any work, on an output path that cannot be written.

    An empty path, a directory or a path naming one (ending in a separator,
    ``.`` or ``..``), a missing parent directory, (unless ``force``) an
    existing file, or a directory where no file can be created. With
    ``replaced`` (the output is written by :func:`atomic_write`), also an
    existing path that is not a regular file.
    """
    if not path:
        # os.path.abspath("") is the working directory, whose parent would
        # get the temporary file.
        raise ValueError(f"{owner_prefix(owner)}{what} is empty; give a file name")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{owner_prefix(owner)}{path} is a directory; give a file name")
    if replaced and os.path.exists(path) and not os.path.isfile(path):
        # atomic_write renames a new file onto the path: a device (/dev/null)
        # or a FIFO would be replaced by a regular file, not written into.
        # Both follow symbolic links: a link to a regular file is replaced
        # by the new file, as a regular file is.
        raise ValueError(f"{owner_prefix(owner)}{what} {path} is not a regular file (a device, "
                         "FIFO or socket), which writing would replace; give a file name")
    if os.path.basename(path) in ("", ".", ".."):
        # abspath() drops the trailing part, so the file would be written
        # beside the directory before the rename fails.
        raise IsADirectoryError(f"{owner_prefix(owner)}{what} {path!r} names a directory, not a "
                                "file; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{owner_prefix(owner)}cannot write {path}: no directory "
                                f"{directory}")
    try:
        name_max = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not told: the write will say
        name_max = None
    name = len(os.fsencode(os.path.basename(path)))
    if name_max and name > name_max:
        # The probe below uses a shortened name, so only the final rename
        # would fail, after the work.
        raise ValueError(f"{owner_prefix(owner)}{what} {path!r}: its name is {name} bytes, more "
                         f"than the {name_max} the file system allows")
    if not force and os.path.exists(path):
        raise FileExistsError(f"{owner_prefix(owner)}{path} exists; pass {flag} to overwrite it")
    # Permission bits cannot tell (root passes them, and /proc refuses new
    # files whatever they say): create and remove a file beside the output,
    # as atomic_write will, so that a long run does not fail only at the end.
    os.remove(_temporary_file_beside(owner, path, directory))


def _temporary_file_beside(owner, path, directory):
    """A new empty private file in ``directory`` named after ``path``; its path."""
    try:
        # A shortened name: the prefix and suffix would take a name near the
        # file system's limit (255 bytes) past it.
        # Cut by bytes (a character takes up to 4), whole characters kept.
        name = os.fsencode(os.path.basename(path))[:100].decode("utf-8", errors="ignore")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise type(exc)(f"{owner_prefix(owner)}cannot write {path}: cannot create a file in "
                        f"{directory} ({exc.strerror or exc})") from exc
    os.close(fd)
    return tmp


def atomic_write(path, write, owner=None):
    """Call ``write(tmp_path)``, then rename tmp_path to ``path``.

    The temporary file sits beside ``path`` (same file system, so the rename is
    atomic) and is removed if ``write`` fails: a failure never leaves a
    half-written ``path``. The file's data reaches the disk before the rename,
    and the rename before this returns, so that a crash of the machine leaves
    the old file or the new one. A symbolic link at ``path`` is replaced by
    the new file, its target left as it was (the rename replaces the link).
    """
    atomic_write_files([(path, write)], owner)


def atomic_write_files(files, owner=None):
    """:func:`atomic_write` for several files (``[(path, write)]``) that go
    together: every one is written to its temporary file before the first is
    renamed, so that a failure in any leaves all the old files."""
    planned = []
    for path, write in files:
        path = check_path(owner, path)
        check_output_path(owner, path)
        planned.append((path, write))
    written = []  # (temporary file, path)
    try:
        for path, write in planned:
            directory = os.path.dirname(os.path.abspath(path))
            written.append((_temporary_file_beside(owner, path, directory), path))
            _written(write, written[-1][0], path, owner)
            _sync(written[-1][0], owner, path)
        for tmp, path in written:
            # mkstemp makes the file private (0600); give it the mode a plain
            # open() would, or the mode of the file it replaces.
            if os.path.exists(path):
                mode = os.stat(path).st_mode & 0o777
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(tmp, mode)
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for directory in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for _, p in written):
        _sync(directory)


def _written(write, tmp, path, owner):
    """``write(tmp)``; a failed write (a full disk) is an OSError naming
    ``path``: safetensors' own error, and an OSError that names no file or
    only the hidden temporary one (matplotlib's savefig names neither)."""
    try:
        write(tmp)
    except OSError as exc:
        if exc.filename not in (None, tmp):
            raise
        message = f"{owner_prefix(owner)}cannot write {path}: {exc.strerror or exc}"
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise OSError(f"{owner_prefix(owner)}cannot write {path}: {exc}") from exc


def _sync(path, owner=None, target=None):
    """Flush a file's data (``target``: the path it will become) or, without
    ``target``, a directory's entries to the disk. A file system that cannot
    sync (some refuse directories, or any fsync) is left as it is; an error
    writing the file's data is an OSError naming ``target``."""
    try:
        # A file for writing: Windows flushes only handles open for writing
        # (fsync of a read-only one is EBADF). Directories open read-only.
        fd = os.open(path, os.O_RDONLY if target is None else os.O_RDWR)
    except OSError:
        if target is None:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if target is not None and exc.errno not in (errno.EINVAL, errno.EROFS,
                                                    errno.EOPNOTSUPP):
            raise type(exc)(exc.errno, f"{owner_prefix(owner)}cannot write {target}: "
                            f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)
