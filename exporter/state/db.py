"""The state database: one SQLite file in the state directory, held by one process.

SQLite gives atomic commits, so a `kill -9` at any moment leaves either the old or the new
state, never half of one. Opening it tells real corruption apart from a passing problem:

- a file that is not a database, or fails `PRAGMA quick_check`, is moved aside
  (`state.db.corrupt-<unix ms>`, never overwriting an earlier copy) and a fresh one is made;
- anything else (locked or busy beyond the busy timeout, disk full, permissions, I/O errors)
  is a `StateError`: the file is kept as it is and the command or cycle fails, so a state
  that is merely busy is never thrown away.

The files hold run names and tags of every run: the directory is made 0700 and the files
0600. `ensure_file` (each cycle) notices a `state.db` deleted or replaced under the running
process (the open connection keeps the old inode alive) and writes it back from that
connection, so nothing is sent again under new keys after a restart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from exporter.state.schema import SCHEMA_VERSION, create, migrate

FILE = "state.db"
LOCK = "exporter.lock"
# Wait this long for a lock held by another connection (a pull scrape, a backup tool)
# before failing; a cycle that fails this way is retried next interval with state intact.
BUSY_TIMEOUT_SECONDS = 10.0
CORRUPTION = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
# `PRAGMA quick_check` reads every page (0.35-0.94 s on a 297 MB state): at start it runs
# only on files up to this size, or after a cycle met corruption (`SUSPECT` flag file);
# a larger file gets a check of its header and schema, so a start costs the same at any size.
FULL_CHECK_MAX_BYTES = 64 * 1024 * 1024
SUSPECT = f"{FILE}.check"
# SQLite binds at most 32766 parameters; IN lists are cut well below that.
CHUNK = 500


class StateError(Exception):
    """The state directory cannot be used right now; message safe to show."""


# What to do about a passing SQLite error, by the words of its message.
_WRITABLE = (
    "make the file and its directory writable by the exporter's user (chown/chmod), "
    "or set EXPORTER_STATE_DIR to a writable directory"
)
_NEXT_STEP = (
    ("readonly", _WRITABLE),
    ("full", "free space on its disk; the next cycle retries"),
    ("disk i/o", "check the disk and the file size limit (ulimit -f); the next cycle retries"),
    ("locked", "another program holds it: stop it; the next cycle retries"),
    ("busy", "another program holds it: stop it; the next cycle retries"),
)


def qmarks(items: Sequence[object]) -> str:
    """The qmark placeholders `?,?,...` of an IN list binding these items (cut lists to
    `CHUNK` items: SQLite binds at most 32766 parameters)."""
    return ",".join("?" * len(items))


def explain(path: Path, exc: sqlite3.Error) -> str:
    """One line naming the state file, SQLite's words (with the OS error behind a disk
    error) and the next step to take."""
    text = str(exc)
    step = next(
        (hint for word, hint in _NEXT_STEP if word in text.lower()),
        "fix the cause; the state is kept as it is and the next cycle retries",
    )
    cause = os_cause(path) if _is_disk_error(exc) else None
    said = f" ({cause})" if cause else ""
    return f"state database {path}: {text}{said}; {step}"


def _is_disk_error(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_IOERR", "SQLITE_FULL"))


def os_cause(path: Path) -> str | None:
    """The OS error behind a disk error of SQLite's, which does not carry it ("disk I/O
    error" is EFBIG under a file size limit, or EIO), by asking the OS for as much room
    beside the state as its largest file holds, in a scratch file deleted at once. None
    when the OS grants it (the cause has passed, or lies elsewhere)."""
    files = [Path(f"{path}{suffix}") for suffix in ("", "-wal")]
    size = max((f.stat().st_size for f in files if f.exists()), default=0) + _ROOM_MARGIN
    probe = path.with_name(f"{FILE}.room")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"[Errno {exc.errno}] {exc.strerror}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


_ROOM_MARGIN = 64 * 1024
# The WAL's own header, and each frame's header before its page (sqlite.org/walformat.html).
_WAL_HEADER = 32
_FRAME_HEADER = 24


def reserve_wal(conn: sqlite3.Connection, frames: int) -> None:
    """Make sure the WAL can take `frames` more pages without growing on disk.

    A delivery is recorded after its 2xx: if that write failed (disk full, file size
    limit) the points would be sent again. The room is taken before the request instead
    (`posix_fallocate`, which fails with the OS error when there is none): SQLite writes
    its next frames inside the file, never past room already granted. The next frame goes
    at or before the end of the frames in use (`mxFrame` of the wal-index header, read
    from the shared-memory file), so the file grows only by what is missing. StateError
    naming the file and the OS error when the room cannot be had: nothing is sent."""
    path = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    wal = Path(f"{path}-wal")
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    if not path.name or not wal.exists():
        return  # in memory, or not in WAL mode
    end = _WAL_HEADER + (_frames_in_use(path, page) + frames) * (page + _FRAME_HEADER)
    try:
        fd = os.open(wal, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size < end:
                os.posix_fallocate(fd, 0, end)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # a file system that cannot allocate ahead: the claim's write still checks
        raise StateError(
            f"state database {path}: no room to record a delivery ([Errno {exc.errno}] "
            f"{exc.strerror}); nothing is sent until it can be recorded: free space on its "
            "disk or raise the file size limit (ulimit -f); the points stay queued"
        ) from None


def _frames_in_use(path: Path, page: int) -> int:
    """`mxFrame` of the wal-index header (native byte order, at offset 16 of `-shm`, valid
    once `isInit` at offset 12 is set); else the WAL file's size in frames, an upper bound."""
    try:
        with Path(f"{path}-shm").open("rb") as shm:
            header = shm.read(20)
        if len(header) == 20 and header[12]:
            return int(struct.unpack("=I", header[16:20])[0])
    except OSError:
        pass
    return -(-Path(f"{path}-wal").stat().st_size // (page + _FRAME_HEADER))


def is_corruption(exc: sqlite3.Error) -> bool:
    """True only for errors that mean the file's content is damaged or not a database."""
    return getattr(exc, "sqlite_errorname", "") in CORRUPTION


class Database:
    """The open state database and the directory lock that makes it this process's own."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.path = directory / FILE
        self.clock = clock
        self.set_aside: Path | None = None  # where a corrupt database was moved, if anywhere
        self._lock = _lock_directory(directory)
        try:
            self.conn = self._open()
            self._identity = _identity(self.path)
        except BaseException:
            self._lock.close()
            raise

    def _open(self) -> sqlite3.Connection:
        suspect = self.directory / SUSPECT
        try:
            if self.path.exists():
                full = suspect.exists() or self.path.stat().st_size <= FULL_CHECK_MAX_BYTES
                _probe(self.path, full)
                self.path.chmod(0o600)
            else:
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            suspect.unlink(missing_ok=True)
            return _connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                cause = os_cause(self.path) if _is_disk_error(exc) else None
                said = f", {cause}" if cause else ""
                raise StateError(
                    f"state database {self.path} cannot be used now ({exc}{said}); it is kept "
                    "as it "
                    "is: fix the cause (disk space, permissions, another program holding it, "
                    "a newer exporter's state) and start again"
                ) from None
        self.set_aside = self._move_aside()
        suspect.unlink(missing_ok=True)
        try:
            return _connect(self.path)
        except sqlite3.Error as exc:
            raise StateError(f"cannot create a fresh state database {self.path}: {exc}") from None

    def _move_aside(self) -> Path:
        stamp = int(self.clock() * 1000)
        aside = self.path.with_name(f"{FILE}.corrupt-{stamp}")
        while aside.exists():
            stamp += 1
            aside = self.path.with_name(f"{FILE}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.replace(Path(f"{aside}{suffix}"))
        return aside

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            # SQLite may have rolled back already (disk full, interrupt): keep its error.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def reader(self) -> sqlite3.Connection:
        """A separate read-only connection (WAL lets it read while a cycle writes)."""
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_SECONDS,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        return conn

    def ensure_file(self) -> bool:
        """Check that `state.db` is still the file this process opened; if it was deleted
        or replaced, re-take the directory lock and write the database back from the open
        connection (SQLite's backup API). True when it had to be written back; StateError
        when another process holds the directory now."""
        try:
            if _identity(self.path) == self._identity:
                return False
        except OSError:
            pass
        self._relock()
        partial = self.path.with_name(f"{FILE}.restoring")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY, 0o600))
        target = sqlite3.connect(partial)
        try:
            self.conn.backup(target)
        finally:
            target.close()
        for suffix in ("-wal", "-shm"):  # of a replacing file: they are not ours
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        partial.replace(self.path)
        self.conn.close()
        self.conn = _connect(self.path)
        self._identity = _identity(self.path)
        return True

    def _relock(self) -> None:
        lock_path = self.directory / LOCK
        try:
            held = os.fstat(self._lock.fileno())
            now = lock_path.stat()
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return  # the lock file is still the one this process holds
        except OSError:
            pass
        lock = _lock_directory(self.directory)  # StateError if another process holds it
        self._lock.close()
        self._lock = lock

    def suspect(self) -> None:
        """A cycle met corruption: the next start checks every page of the file."""
        with contextlib.suppress(OSError):  # the cycle's own error is what gets reported
            (self.directory / SUSPECT).touch()

    def close(self) -> None:
        self.conn.close()
        self._lock.close()


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _lock_directory(directory: Path) -> IO[str]:
    if directory.exists() and not directory.is_dir():
        raise StateError(
            f"state directory {directory} is a file, not a directory: move it away, or set "
            "EXPORTER_STATE_DIR (or --state-dir) to a directory"
        )
    try:
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            directory.chmod(0o700)  # whatever the umask
        fd = os.open(directory / LOCK, os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o600)
        lock = os.fdopen(fd, "a+")
    except OSError as exc:
        raise StateError(
            f"state directory {directory} is not usable ({exc.strerror or exc}); set "
            "EXPORTER_STATE_DIR to a writable directory"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StateError(
            f"state directory {directory} is in use by another exporter process; give each "
            "process its own EXPORTER_STATE_DIR (one per shard)"
        ) from None
    return lock


def _probe(path: Path, full: bool = True) -> None:
    """Prove an existing file is a sound database (`full`: every page; else its header and
    schema), over a read-only connection: closing a read-write one would fold its WAL into
    a damaged file and delete the WAL, so the copy set aside would not be what was found."""
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        if full:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        else:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            verdict = "ok"
    finally:
        conn.close()
    if verdict != "ok":
        error = sqlite3.DatabaseError(f"integrity check failed: {verdict}")
        error.sqlite_errorname = "SQLITE_CORRUPT"
        raise error


def _connect(path: Path) -> sqlite3.Connection:
    """Connect read-write and bring the schema up to date."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and _has_table(conn, "watermark"):
            migrate(conn, from_version=1)
        elif version < SCHEMA_VERSION:
            create(conn)
        elif version > SCHEMA_VERSION:
            raise sqlite3.OperationalError(  # noqa: TRY301 - a passing problem, not corruption
                f"schema version {version} is newer than this exporter's {SCHEMA_VERSION}"
            )
    except BaseException:
        conn.close()
        raise
    return conn


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None
