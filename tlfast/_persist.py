"""Durable artefacts on disk: the one mechanism behind every folder and file tlfast writes or reads.

Writing.  A folder artefact (a saved ``Index``, a ``ShardedIndex``, a ``FeatureStore``) is built in
a *staging* folder beside its target, ``.<name>.tlfast-tmp-<random>``, and committed in one step:
``renameat2(RENAME_EXCHANGE)`` swaps the staging folder and the old version atomically (then the
old one, now under the staging name, is removed); where the kernel or file system has no exchange,
two renames with recovery (old -> ``.<name>.tlfast-old-<random>``, staging -> target) and the next
save or load renames the old version back if a crash fell between them.  At every instant the
target is the old version or the new one.  A single-file artefact (CLI outputs) is a temp file and
one ``rename``.  The writer holds an ``flock`` on each staging folder / temp file while it works;
since the kernel drops the lock when the process dies (``kill -9`` too), the next save or load of
the same target removes every temporary whose lock it can take, and never one that a live writer
holds.  Files are written with ordinary ``write`` calls (never through a memory map of a sparse
file, which turns a full disk into SIGBUS) and every failure is an ``OSError`` naming the path.

Replacing.  ``overwrite=True`` replaces only an artefact of the same kind: a folder whose
``manifest.json`` has this artefact's format and which holds nothing its manifest does not list.
Anything else (a user's folder, a folder with a foreign or broken manifest, a plain file, a
device node) is refused with ``FileExistsError``.

Reading.  ``read_manifest`` checks the manifest against a schema (``ValueError`` naming the key,
never a bare ``KeyError``); ``inside`` confines every name the manifest mentions to the folder
(no absolute paths, no ``..``, no symlinks); ``check_listing`` refuses files the manifest does
not list (so deleting an entry from ``files`` cannot switch its checks off); ``open_verified``
checks type, size and sha256 on the descriptor that is then read or mapped, and ``MappedFile``
re-checks the size with ``fstat`` before a mapped file is read again, so a file truncated from
outside is a ``ValueError``, not SIGBUS.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so temporaries of dead writers are never recognised as stale
    fcntl = None

MANIFEST = "manifest.json"
TMP_TAG = ".tlfast-tmp-"      # staging folder or temp file of a writer
OLD_TAG = ".tlfast-old-"      # the previous version during a two-rename commit
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------- errors
@contextlib.contextmanager
def naming(path: os.PathLike | str, doing: str = "writing") -> Iterator[None]:
    """Re-raise an ``OSError`` that does not name a path as one naming ``path`` (same errno)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OSError(exc.errno, f"{doing} {os.fspath(path)} failed: {reason}", os.fspath(path)) from exc


# ----------------------------------------------------------------------------------- locks
def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def lock(path: Path) -> int | None:
    """An fd holding the exclusive flock of ``path`` (released when it is closed or the process dies),
    or None when a live process holds it (without flock: always an fd)."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None or _try_lock(fd):
        return fd
    os.close(fd)
    return None


def _temporaries(target: Path) -> list[Path]:
    prefixes = (f".{target.name}{TMP_TAG}", f".{target.name}{OLD_TAG}")
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in names if n.startswith(prefixes)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(target: str | os.PathLike) -> None:
    """Finish or undo what a dead writer left beside ``target``: an old version orphaned between
    the two renames of a fallback commit goes back to ``target``; other temporaries are removed.
    Temporaries whose writer is alive (holds the flock) are left alone; errors are ignored (a
    read-only folder is fine)."""
    target = Path(os.path.abspath(target))  # "." and "dir/" have a name and a parent
    for tmp in _temporaries(target):
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue
            if OLD_TAG in tmp.name and not os.path.lexists(target):
                os.rename(tmp, target)
            else:
                _remove(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class Kind:
    """One artefact format: its manifest's ``format`` string, the newest version this tlfast reads,
    a schema (key -> checker raising ValueError) and the names a valid manifest lists."""
    format: str
    what: str
    max_version: int | None
    schema: dict[str, Callable[[Any], None]]
    listed: Callable[[dict], Iterable[str]]
    optional: dict[str, Callable[[Any], None]] = field(default_factory=dict)


def is_int(lo: int | None = None) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
    return check


def is_str(choices: Iterable[str] | None = None) -> Callable[[Any], None]:
    allowed = None if choices is None else set(choices)

    def check(v: Any) -> None:
        if not isinstance(v, str):
            raise ValueError(f"must be a string, got {v!r}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}, got {v!r}")
    return check


def is_instance(*types: type) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
            raise ValueError(f"must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
    return check


def is_record(schema: dict[str, Callable[[Any], None]]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, dict):
            raise ValueError(f"must be an object, got {v!r}")
        for key, sub in schema.items():
            if key not in v:
                raise ValueError(f"lacks {key!r}")
            try:
                sub(v[key])
            except ValueError as exc:
                raise ValueError(f"[{key!r}] {exc}") from None
    return check


def is_list(item: Callable[[Any], None]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, list):
            raise ValueError(f"must be a list, got {v!r}")
        for i, x in enumerate(v):
            try:
                item(x)
            except ValueError as exc:
                raise ValueError(f"[{i}] {exc}") from None
    return check


def is_sha256(v: Any) -> None:
    if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
        raise ValueError(f"must be a sha256 hex digest, got {v!r}")


FILE_RECORD = is_record({"bytes": is_int(0), "sha256": is_sha256})


def is_files(v: Any) -> None:
    """``{"name": {"bytes": int, "sha256": hex}}`` with names that are plain, confined file names."""
    if not isinstance(v, dict):
        raise ValueError(f"must be an object of file records, got {v!r}")
    for name, rec in v.items():
        check_name(name)
        try:
            FILE_RECORD(rec)
        except ValueError as exc:
            raise ValueError(f"[{name!r}] {exc}") from None


def check_name(name: Any) -> None:
    """A name inside an artefact folder: relative, no ``..``, no empty or hidden parts."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) \
            or "\0" in name or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"file name {name!r} points outside the folder (absolute or with '..'); "
                         f"the manifest is corrupted or hostile")


# ----------------------------------------------------------------------------------- reading
def read_manifest(folder: str | os.PathLike, kind: Kind, name: str = MANIFEST) -> dict:
    """The manifest ``name`` of the ``kind`` artefact at ``folder``, checked against its schema.

    Missing -> ``FileNotFoundError``; not JSON, another format, a newer version, a missing or
    mistyped key -> ``ValueError`` naming the file and the key."""
    path = inside(folder, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a tlfast {kind.what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a symlink or special file): not a tlfast {kind.what}")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupted ({exc}); re-save the {kind.what}") from exc
    if not isinstance(meta, dict) or meta.get("format") != kind.format:
        raise ValueError(f"{path} is not a tlfast {kind.what} manifest (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {kind.format!r})")
    if kind.max_version is not None:
        version = meta.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"{path}: 'format_version' must be an integer, got {version!r}")
        if version > kind.max_version:
            raise ValueError(f"{path} has format version {version}; this tlfast reads up to "
                             f"{kind.max_version} (upgrade tlfast)")
    for key, check in [*kind.schema.items(), *((k, c) for k, c in kind.optional.items() if k in meta)]:
        if key not in meta:
            raise ValueError(f"{path} lacks the key {key!r}; the {kind.what} manifest is corrupted "
                             f"(re-save the {kind.what})")
        try:
            check(meta[key])
        except ValueError as exc:
            raise ValueError(f"{path}: key {key!r} {exc}; the {kind.what} manifest is corrupted "
                             f"(re-save the {kind.what})") from None
    return meta


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` confined to ``folder``: no absolute path, no ``..``, no symlink anywhere
    below ``folder`` (each part is lstat'ed)."""
    check_name(name)
    folder = Path(folder)
    path = folder
    for part in name.replace("\\", "/").split("/"):
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise ValueError(f"{path} is a symlink; an artefact folder holds only its own files "
                                 f"(a link could point outside it)")
        except FileNotFoundError:
            break
    return path


def check_listing(folder: str | os.PathLike, listed: Iterable[str], what: str) -> None:
    """Refuse entries of ``folder`` that its manifest does not list (besides the manifest itself)."""
    folder = Path(folder)
    known = {n.replace("\\", "/").split("/")[0] for n in listed} | {MANIFEST}
    extra = sorted(n for n in os.listdir(folder) if n not in known)
    if extra:
        raise ValueError(f"{folder} holds {', '.join(repr(n) for n in extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}, which its manifest does not list: not an "
                         f"unmodified tlfast {what} (remove the extra files or re-save the {what})")


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def open_verified(path: Path, record: dict | None, *, verify: bool, what: str) -> int:
    """An fd on the regular file ``path`` whose size (and sha256 when ``verify``) match ``record``
    (``{"bytes", "sha256"}``, "bytes" optional; None: only the type is checked).  The caller reads or maps this fd, so
    what was checked is what is used.  Problems -> ``ValueError`` naming the file."""
    where = f"{what} file {path.name!r} in {path.parent}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} file {path.name!r} is missing from {path.parent}; re-save the {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{where} is a symlink; re-save the {what}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{where} is not a regular file; re-save the {what}")
        if record is not None:
            if "bytes" in record and st.st_size != record["bytes"]:
                raise ValueError(f"{where} is truncated or altered: {st.st_size} bytes, "
                                 f"expected {record['bytes']}; re-save the {what}")
            if verify and sha256_fd(fd) != record["sha256"]:
                raise ValueError(f"{where} is corrupted (sha256 mismatch); re-save the {what}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _npy_header(f: BinaryIO, path: Path) -> tuple[tuple, np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ValueError(f"{path} is not a valid .npy file ({exc})") from exc
    if dtype.hasobject:
        raise ValueError(f"{path} holds Python objects; tlfast files hold numbers only")
    return shape, dtype, fortran


def load_npy(fd: int, path: Path, *, mmap_mode: bool) -> tuple[np.ndarray, "MappedFile | None"]:
    """The array in the .npy file open at ``fd``: read into memory, or mapped read-only (with the
    ``MappedFile`` that guards the map).  Takes ownership of ``fd``."""
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            shape, dtype, fortran = _npy_header(f, path)
            offset = f.tell()
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            size = os.fstat(fd).st_size
            if offset + n > size:
                raise ValueError(f"{path} holds {size - offset} data bytes, its header promises {n}; truncated")
            order = "F" if fortran else "C"
            if not mmap_mode or n == 0:
                arr = np.fromfile(f, dtype=dtype, count=n // dtype.itemsize).reshape(shape, order=order)
                os.close(fd)
                return arr, None
            arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)  # maps f's fd
        return arr, MappedFile(fd, path, offset + n)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


class MappedFile:
    """A file tlfast maps: its fd stays open so that ``check()`` (one fstat) can tell, before the
    map is read again, whether the file was truncated from outside -- reading a mapped page past
    the end of a file is SIGBUS, which no Python code can catch."""

    def __init__(self, fd: int, path: Path, size: int):
        self.fd, self.path, self.size = fd, path, size

    def check(self) -> None:
        size = os.fstat(self.fd).st_size
        if size < self.size:
            raise ValueError(f"{self.path} shrank from {self.size} to {size} bytes while memory-mapped (it was "
                             f"changed outside tlfast); load it again")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self.fd)


# ----------------------------------------------------------------------------------- writing
class HashingWriter:
    """A binary file written with plain ``write`` calls, hashed as written; errors name the path."""

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()
        self.bytes = 0
        with naming(path):
            self._f = open(path, "xb")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        with naming(self.path):
            self._f.write(view)
        self.sha.update(view)
        self.bytes += view.nbytes
        return view.nbytes

    def close(self) -> dict:
        """Flush, fsync and close; the file's record ``{"bytes", "sha256"}``."""
        with naming(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def write_npy(path: Path, blocks: Iterable[np.ndarray], dtype: Any, shape: tuple[int, ...]) -> dict:
    """A C-order .npy file of ``shape`` from row ``blocks`` written one after another (no memory
    map, so the corpus never needs to be in memory); returns its record."""
    w = HashingWriter(path)
    try:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        with naming(path):
            np.lib.format.write_array_header_1_0(w, header)
        data_start = w.bytes
        for block in blocks:
            w.write(np.ascontiguousarray(block, dtype=dtype))
        promised = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if w.bytes - data_start != promised:
            raise RuntimeError(f"writing {path}: {w.bytes - data_start} data bytes written, {promised} promised")
        return w.close()
    except BaseException:
        w.abort()
        raise


def save_npy(path: Path, array: np.ndarray) -> dict:
    """``array`` as a .npy file (``np.save``'s format, written as ``write_npy`` does); its record."""
    array = np.asarray(array)
    return write_npy(path, [array], array.dtype, array.shape)


def write_bytes(path: Path, data: Any) -> dict:
    """``data`` (bytes or a buffer) as the new file ``path``; its record."""
    w = HashingWriter(path)
    try:
        w.write(data)
        return w.close()
    except BaseException:
        w.abort()
        raise


def write_json(path: Path, obj: Any) -> dict:
    return write_bytes(path, json.dumps(obj, indent=1).encode())


def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of a file written by someone else (an approximate index's save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"bytes": os.fstat(fd).st_size, "sha256": sha256_fd(fd)}
    finally:
        os.close(fd)


def _umasked(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Replace the file ``path`` atomically with what ``write(binary file)`` writes: readers see the
    old file or the whole new one (temp file, fsync, rename).  A symlink is followed (its target
    is replaced); a character device or FIFO (``/dev/null``, a pipe) is written into, never
    replaced; a folder is an error.  The file gets the usual permissions (0666 & ~umask)."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            buffer = io.BytesIO()  # writers such as zipfile seek, which a pipe or device cannot
            write(buffer)
            with naming(path), open(path, "wb") as f:
                f.write(buffer.getbuffer())
            return path
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(errno.EISDIR, f"{path} exists and is not a file; choose another output path",
                                    os.fspath(path))
    with naming(path.parent, "creating"):
        path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.parent / f".{path.name}{TMP_TAG}{secrets.token_hex(4)}"
    with naming(tmp):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _try_lock(fd)
        with naming(path), os.fdopen(os.dup(fd), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with naming(path):
            os.chmod(tmp, _umasked(0o666))
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return path


# ----------------------------------------------------------------------------------- folders
def check_replaceable(target: Path, kind: Kind, overwrite: bool) -> None:
    """Raise unless a new ``kind`` artefact may be committed at ``target``: nothing there, an empty
    folder, or (with ``overwrite``) a ``kind`` artefact holding only what its manifest lists."""
    if not os.path.lexists(target):
        return
    st = os.lstat(target)
    if stat.S_ISDIR(st.st_mode) and not os.listdir(target):
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, f"{target} exists; pass overwrite=True or choose another path",
                              os.fspath(target))
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{target} exists and is not a tlfast {kind.what} folder (a file, "
                                            f"link or device); overwrite replaces only a {kind.what}: choose "
                                            f"another path", os.fspath(target))
    try:
        meta = read_manifest(target, kind)
        check_listing(target, kind.listed(meta), kind.what)
    except (ValueError, FileNotFoundError) as exc:
        raise FileExistsError(errno.EEXIST, f"{target} exists and is not a tlfast {kind.what} that overwrite may "
                                            f"replace ({exc}); delete it yourself or choose another path",
                              os.fspath(target)) from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"replacing {b} failed: {os.strerror(err)}", os.fspath(b))


def commit(stage: Path, target: Path) -> None:
    """Put the complete folder ``stage`` at ``target`` in one step (see the module doc)."""
    with naming(target, "replacing"):
        if not os.path.lexists(target):
            os.rename(stage, target)  # an empty folder created meanwhile is replaced; a full one fails
        elif _exchange(stage, target):
            shutil.rmtree(stage, ignore_errors=True)  # the old version, now under the staging name
        else:
            old = target.parent / f".{target.name}{OLD_TAG}{secrets.token_hex(4)}"
            fd = lock(target)  # the lock moves with the folder: recover() leaves it to us
            try:
                os.rename(target, old)
                os.rename(stage, target)
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def staging(target: str | os.PathLike, kind: Kind, *, overwrite: bool) -> Iterator[Path]:
    """A fresh staging folder for a new ``kind`` artefact at ``target``; on normal exit it is
    committed (atomically replacing the old version, see ``check_replaceable``), on an error it
    is removed and ``target`` is untouched."""
    target = Path(os.path.abspath(target))
    recover(target)
    check_replaceable(target, kind, overwrite)
    with naming(target.parent, "creating"):
        target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}{TMP_TAG}{secrets.token_hex(4)}"
    with naming(stage, "creating"):
        os.mkdir(stage, _umasked(0o777) | 0o700)
    fd = lock(stage)  # ours alone: created just now under a random name
    try:
        yield stage
        _fsync_dir(stage)
        check_replaceable(target, kind, overwrite)  # something may have appeared while we wrote
        commit(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
