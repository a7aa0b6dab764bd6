"""Small file helpers shared by every module: atomic writes, JSONL (written whole or appended
and fsynced), and output folder checks.

Every folder lrem writes holds a marker file (`.lrem-output`), so a later run can tell its own
output (which it may replace when asked) from a user's folder (which it never touches).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

# mkstemp/mkdtemp create 0600/0700 entries; outputs should get the usual umask permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    A crash or an exception leaves the old file (or nothing), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


MARKER = ".lrem-output"


class OutputError(ValueError):
    """An output path lrem refuses to write (an input, a file, someone else's folder)."""


def write_marker(folder: Path, files: list[str] | None = None) -> None:
    """Mark `folder` as lrem's; the pid lets a later run tell a dead writer's temp folder. `files`
    starts the record of what lrem wrote there (`record_files`; None: unknown, nothing refused)."""
    info = {"pid": os.getpid(), "host": socket.gethostname()}
    if files is not None:
        info["files"] = sorted(files)
    (folder / MARKER).write_text(json.dumps(info) + "\n")


def _read_marker(folder: Path) -> dict | None:
    """The JSON object in `folder`'s marker (writer, files), or None: no marker, or not one lrem wrote."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def record_files(folder: Path, *names: str) -> None:
    """Note in `folder`'s marker the top-level entries lrem wrote there: all of them now (no
    `names`: `atomic_dir`, before its folder goes into place), or `names` added to the record (an
    entry a run folder gets as it goes, `claim_dir`; a file a later command writes into an output,
    e.g. a model's router.json). An --overwrite then refuses a folder that holds entries lrem did
    not write (`unrecorded`). Writers in place record an entry before creating it: a kill between
    the two leaves a name without its entry, never an entry nobody recorded."""
    folder = Path(folder)
    info = _read_marker(folder)
    if info is None:
        return
    if names:
        if not isinstance(info.get("files"), list):
            return  # an older lrem's folder: what else it holds is unknown, so nothing is recorded
        if set(names) <= set(info["files"]):
            return  # a resumed run's entries, recorded already: the marker is not rewritten
        info["files"] = sorted(set(info["files"]) | set(names))
    else:
        info["files"] = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps(info) + "\n")


def unrecorded(folder: Path) -> list[str]:
    """Top-level entries of an lrem output folder that its marker does not list as lrem's (a user's
    notes, a plot): none where the marker lists nothing (an older lrem's folder, whose contents
    are unknown). Left out: the marker, lrem's own temp entries (`.NAME.*.tmp` / `.old`, a writer
    killed mid-write) and `.DS_Store`; a user's other dot-entries count (a `.git` of a model folder
    pushed to the hub by git)."""
    listed = (_read_marker(folder) or {}).get("files")
    if not isinstance(listed, list):
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in listed and not _ours_or_junk(p.name))


def _ours_or_junk(name: str) -> bool:
    """Whether a top-level entry an output folder's record omits is nobody's work: the marker, a
    temp entry of lrem's atomic writers, or macOS's folder metadata."""
    return name in (MARKER, ".DS_Store") or (name[:1] == "." and name.endswith((".tmp", ".old")) and name.count(".") >= 3)


def is_lrem_output(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def claim_dir(folder: str | os.PathLike, adopt: bool = False, files: Iterable[str] | None = None) -> Path:
    """Create `folder` (a resumable run folder, written in place) and mark it as lrem's. A folder
    that holds files but no marker is someone else's: an `OutputError`, since once marked a later
    `--overwrite` would delete it; `adopt` marks it anyway (a folder lrem wrote before it marked
    its folders, which the caller has recognised).

    `files`: the top-level entries the run writes, recorded in the marker now (the caller adds
    more with `record_files` before writing them), so that an `--overwrite` refuses the folder
    once it also holds a user's (`unrecorded`). A new or empty folder starts the record; an
    adopted one, or an older lrem's that holds files, keeps none (its contents are unknown:
    nothing is refused). None: the caller records nothing, so none is started.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_lrem_output(folder):
        if not adopt and any(folder.iterdir()):
            raise OutputError(f"{folder}: folder is not empty and was not written by lrem (no {MARKER}); "
                              "choose a new folder")
        write_marker(folder, [] if files is not None and not any(folder.iterdir()) else None)
    elif files is not None and is_unstarted(folder) and not isinstance((_read_marker(folder) or {}).get("files"), list):
        write_marker(folder, [])  # an older lrem's marker on a folder that holds nothing yet: all is known
    files = list(files or ())
    if files:  # (no names would record everything the folder holds: a user's files too)
        record_files(folder, *files)
    return folder


def is_unstarted(folder: str | os.PathLike) -> bool:
    """Whether `folder` is missing, or holds nothing but lrem's marker (claimed, nothing written yet)."""
    folder = Path(folder)
    return not folder.is_dir() or all(p.name == MARKER for p in folder.iterdir())


def prepare_output(out: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False,
                   resume: bool = False, run_files: Iterable[str] = (), in_place: bool = False) -> Path:
    """Check, before any work, that `out` may be written; returns it resolved.

    Allowed: a path that does not exist, an empty folder, or a folder lrem wrote when
    `overwrite` (replace it) or `resume` (continue it) is set. Refused with an `OutputError`: an
    output that is an input or holds one, a file, a foreign non-empty folder, or `/`.
    `run_files`: names that together identify an output of this command written before lrem marked
    its folders; with `resume` or `overwrite`, such a folder counts as lrem's (an interrupted run
    stays resumable, a report can be refreshed). `in_place`: the command refreshes its own files
    in the folder and leaves the rest (`lrem eval`), so a user's entries there are kept, not refused.
    """
    given = str(out)
    out = Path(out).resolve()
    if out.parent == out:
        raise OutputError(f"--out {given}: cannot write the root folder")
    for inp, relation in clashes(out, inputs):
        if relation in ("is", "holds"):  # a folder written inside an input folder leaves the input as it was
            raise OutputError(f"--out {given}: it {relation} the input {inp}; "
                              "writing it would destroy the input (choose another --out)")
    if not (out.exists() or out.is_symlink()):
        return out
    if not out.is_dir():
        raise OutputError(f"--out {given}: is a file, not a folder (choose another --out)")
    if not any(out.iterdir()):
        return out
    run_files = list(run_files)
    legacy_run = (resume or overwrite) and run_files and all((out / name).exists() for name in run_files)
    if not is_lrem_output(out) and not legacy_run:
        raise OutputError(f"--out {given}: folder is not empty and was not written by lrem (no {MARKER}); "
                          f"choose a new folder (if an older lrem wrote it, delete it or add an empty {MARKER})")
    if not (overwrite or resume):
        raise OutputError(f"--out {given}: exists (an earlier lrem output); pass --overwrite to replace it")
    extra = unrecorded(out) if overwrite and not in_place else []
    if extra:  # replacing the folder would delete them
        raise OutputError(f"--out {given}: holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which lrem "
                          "did not write; move them out first (--overwrite replaces the whole folder)")
    if legacy_run and not is_lrem_output(out):
        write_marker(out)  # recognised as lrem's: mark it, so the writers that check the marker accept it
    return out


def prepare_file_output(out: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False,
                        also: Iterable[str | os.PathLike] = ()) -> Path:
    """Check, before any work, that the file `out` may be written; returns it resolved. Refused
    with an `OutputError`: `out` (or a file in `also`, such as its partial file) that is an
    input or lies inside an input folder, a folder, or an existing file without `overwrite`."""
    given = str(out)
    out = Path(out).resolve()
    for path in (out, *(Path(a).resolve() for a in also)):
        for inp, relation in clashes(path, inputs):
            if relation in ("is", "lies inside"):  # a file written into an input folder changes that input
                raise OutputError(f"--out {given}: {path} {relation} the input {inp}; "
                                  "writing it would destroy the input (choose another --out)")
    if out.is_dir():
        raise OutputError(f"--out {given}: is a folder; --out takes a file path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"--out {given} exists; pass --overwrite to replace it")
    return out


def clashes(path: Path, inputs: Iterable) -> list[tuple[object, str]]:
    """(input, how `path` (resolved) meets it: "is", "holds" or "lies inside") for each input it meets."""
    found = []
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        relation = ("is" if src == path else "holds" if path in src.parents
                    else "lies inside" if src in path.parents else None)
        if relation:
            found.append((inp, relation))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(path: Path) -> list[Path]:
    """Remove temp folders `atomic_dir` left beside `path` when its writer died (SIGKILL, power
    loss): those whose marker names a process of this host that no longer runs (a replaced
    output's, set aside as `.NAME.*.old`, names its own long-gone writer)."""
    removed = []
    if not path.exists():
        _restore_set_aside(path)
    for tmp in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.*.old")]:
        if tmp.suffix == ".old":
            # an empty one is a name a writer reserved: safe to drop even while it runs (its rename
            # makes it again); rmdir refuses a full one
            with contextlib.suppress(OSError):
                tmp.rmdir()
                continue
        if _dead_writer(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _restore_set_aside(path: Path) -> None:
    """A writer killed inside `_swap_in`, between setting the output aside (`.NAME.*.old`) and
    renaming its own into place, leaves no `path`: put the output set aside back, rather than
    remove it with the temps. Only when every writer beside it is dead: a live one may be between
    its own two renames right now (its output lands next)."""
    with contextlib.suppress(OSError):  # folders vanish under us where other writers run
        if not all(_dead_writer(t) for t in path.parent.glob(f".{path.name}.*.tmp")):
            return
        olds = [o for o in path.parent.glob(f".{path.name}.*.old") if _dead_writer(o) and any(o.iterdir())]
        if olds:
            os.replace(max(olds, key=lambda o: o.stat().st_mtime), path)


def _dead_writer(folder: Path) -> bool:
    """Whether `folder`'s marker names a process of this host that no longer runs (False where it
    has no marker yet, or is not ours)."""
    info = _read_marker(folder) or {}
    return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])


def _foreign(path: Path, tries: int = 3) -> bool:
    """`path` exists and is a file or someone else's non-empty folder. Looked at again after a
    moment when it seems so: another writer's swap (`_swap_in`) may be moving it just now."""
    for i in range(tries):
        try:
            if not (path.exists() and (not path.is_dir() or (any(path.iterdir()) and not is_lrem_output(path)))):
                return False
        except FileNotFoundError:
            return False
        if i + 1 < tries:
            time.sleep(0.01)
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, carry: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` as a whole.

    Used for outputs made of several files (a dataset, an index, a model), so a reader never
    sees a mix of old and new files. The result holds the lrem marker; an existing `path` is
    replaced only if it is empty or lrem's own (an `OutputError` otherwise, before any work).
    Temp folders of writers that died are removed first. `carry`: top-level entries of `path`
    lrem did not write (`unrecorded`: a user's notes in a run folder the final model replaces),
    moved into the result as they are and left out of its record.
    """
    path = Path(path).resolve()  # "." has no name to put a temp folder beside
    if _foreign(path):
        raise OutputError(f"{path}: exists and is not an lrem output folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    carried = []
    try:
        write_marker(tmp)
        yield tmp
        record_files(tmp)  # what lrem wrote: an --overwrite later refuses a folder holding more
        # the usual umask permissions for what is inside too: safetensors writes its files 0600
        # (through a temp file), so a server running as another user (TEI, vLLM) could not read them
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~_UMASK)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~_UMASK)
        os.chmod(tmp, 0o777 & ~_UMASK)
        for name in carry:  # last, after the record and the permissions: they stay as the user left them
            if os.path.lexists(tmp / name):
                continue  # lrem's own entry of that name wins, as it did before any were carried
            try:
                os.replace(path / name, tmp / name)
            except OSError:  # removed meanwhile, or a mount point
                continue
            carried.append(name)
        _swap_in(tmp, path)
    except BaseException:
        for name in carried:  # back where they were, before the temp folder goes
            with contextlib.suppress(OSError):
                os.replace(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished `tmp` at `path`, setting aside and removing what is there. Writers that
    finish at once (test workers, or two servers, building one model cache) each set the old folder
    aside under a name of their own, and retry when another's folder lands in between: the last
    one wins whole."""
    while True:
        old = None
        if path.exists():
            # rename may replace an empty folder: an empty temp one reserves the name
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            try:
                os.replace(path, old)
            except FileNotFoundError:  # another writer set it aside first
                pass
        try:
            os.replace(tmp, path)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines, atomically, keys in the order given (deterministic bytes)."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


class JsonlLog:
    """An append-only JSONL file: rows are flushed and fsynced as appended; a torn last line is dropped.

    `rows()` reads the file; bytes after the last newline (a write cut short by a crash) are
    truncated away, and a bad complete line raises a ValueError naming file and line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = None

    def rows(self, repair: bool = True) -> list[dict]:
        """The rows; `repair`: cut a torn last line off the file (else it is only left out)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes up to the end of the last complete line
        rows = []
        for n, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{self.path}:{n}: malformed JSON line ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{self.path}:{n}: expected a JSON object")
            rows.append(row)
        if repair and end < len(data):  # a write cut short by a crash: cut it off before appending again
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return rows

    def open(self) -> "JsonlLog":
        """Create the file if missing (empty) and keep it open for appending: readers of a run
        that appended nothing still find the file."""
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
            os.fsync(self._f.fileno())
        return self

    def append(self, *rows: dict) -> None:
        """Write `rows` as JSON lines and fsync them (once for all): on disk when this returns."""
        self.open()
        for row in rows:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def append_jsonl(path: str | os.PathLike, *rows: dict) -> None:
    """Append `rows` to a JSONL file and fsync them, then close it: a log that survives a kill and
    that resumed runs append to (a `JsonlLog` kept open is the same for many appends)."""
    log = JsonlLog(path)
    try:
        log.append(*rows)
    finally:
        log.close()
