"""Where a shared study lives (``--storage``): a journal file, or a database that workers on several hosts reach.

``--storage`` takes

* a journal file: ``journal:PATH`` or a plain ``PATH`` (Optuna's ``JournalFileBackend`` and its lock: processes
  on one host, or on hosts that share the file system);
* a database URL: ``postgresql://user:password@host:port/db`` (driver: psycopg 3, the ``postgres`` extra),
  ``mysql+pymysql://...``, or ``sqlite:///PATH`` (one host).

Every worker of a shared study needs two things beyond Optuna's own storage:

* **liveness** — a heartbeat per running trial, so that the trial of a killed worker is failed and queued again
  with the same parameters (``RetryHeartbeatStaleTrialCallback``). Optuna's ``RDBStorage`` has one (times are the
  database server's); its journal storage has none, so ``HeartbeatJournalStorage`` adds one (a trial system
  attribute holding the writer's clock: hosts sharing a journal must keep their clocks in sync);
* a **claim lock** — taken while a worker counts the trials and asks for the next one, so that the requested
  number of trials is never exceeded: a ``flock`` on a file beside the journal or the SQLite database, a
  session advisory lock on PostgreSQL (``pg_advisory_lock``) or MySQL (``GET_LOCK``). Each is dropped by the
  kernel or the server when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from abliterate.search.journal import journal_backend, no_space_left
from foundation.errors import UserError

FLAG = "--storage"
HEARTBEAT_ATTR = "heartbeat"  # journal only: the writer's time.time() at its last heartbeat
MAX_RETRY = 3  # a trial whose worker died this many times is left failed
DRIVERS = {  # dialect -> (the module SQLAlchemy imports by default, how to install it)
    "postgresql": ("psycopg", ("pip install 'quant-abliterate[postgres]' (psycopg[binary]), or "
                               "write postgresql+psycopg2://... with psycopg2 installed")),
    "mysql": ("MySQLdb", "pip install mysqlclient, or write mysql+pymysql://... and pip install pymysql"),
    "sqlite": ("sqlite3", "use a Python built with sqlite3"),
}


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: a journal file (``journal``) or a database URL (``url``)."""

    journal: Path | None = None
    url: str | None = None

    @property
    def dialect(self) -> str:
        return "journal" if self.journal is not None else self.url.split(":", 1)[0].split("+", 1)[0]

    def describe(self) -> str:
        """For printing and chosen_trial.json: a password in the URL is masked."""
        if self.journal is not None:
            return f"journal:{self.journal.absolute()}"
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def local_file(self) -> Path | None:
        """The file the storage lives in on this host (a journal or an SQLite database), if any."""
        if self.journal is not None:
            return self.journal
        if self.dialect == "sqlite":
            from sqlalchemy.engine import make_url

            database = make_url(self.url).database
            return Path(database) if database and database != ":memory:" else None
        return None


def parse_storage(value: str) -> StorageSpec:
    """``--storage``'s value, checked without connecting (a typo fails before the model loads)."""
    text = value.strip()
    if not text:
        raise UserError(FLAG, "is empty", "pass a journal file (journal:PATH or PATH) or a database URL such as "
                                          "postgresql://user:password@host:5432/db")
    if text.startswith("journal:"):
        text = text[len("journal:"):]
        if not text:
            raise UserError(FLAG, "journal: names no file", "write journal:PATH, e.g. journal:/shared/study.log")
        return StorageSpec(journal=Path(text).expanduser())
    if "://" not in text:
        return StorageSpec(journal=Path(text).expanduser())
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as error:  # ValueError: a port that is not a number
        raise UserError(FLAG, f"{text!r} is not a database URL ({error})",
                        "write dialect://user:password@host:port/database, e.g. postgresql://qa:secret@db:5432/studies, "
                        "or sqlite:///PATH, or journal:PATH") from None
    dialect = url.get_backend_name()
    if dialect not in DRIVERS:
        raise UserError(FLAG, f"unsupported database {dialect!r} in {url.render_as_string(hide_password=True)}",
                        "use postgresql://, mysql:// or sqlite:/// (a shared search needs a lock they provide), "
                        "or a journal file (journal:PATH)")
    if dialect == "sqlite" and (not url.database or url.database == ":memory:"):
        raise UserError(FLAG, f"{text!r} names no database file (an in-memory database is not shared)",
                        "write sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return StorageSpec(url=text)


def _check_driver(spec: StorageSpec) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(spec.url)
    try:
        url.get_dialect().import_dbapi()
    except ImportError as error:
        default, install = DRIVERS[url.get_backend_name()]
        raise UserError(FLAG, f"the database driver for {url.drivername} is not installed ({error.name or default}: "
                              f"{error})", install) from None


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its RDB storage has (Optuna 5 gives the journal none).

    A running trial's heartbeat is a trial system attribute (``HEARTBEAT_ATTR``, seconds since the epoch);
    a RUNNING trial whose heartbeat is older than the grace period, or that has none, is stale. Workers
    record a trial's first heartbeat before they release the claim lock, and stale trials are failed under
    that lock, so a trial without one was left by a run that is gone (killed before this mode existed).
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int,
                 callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self._heartbeat_interval, self._grace_period, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):  # failed as stale by another worker: nothing to keep alive
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - trial.system_attrs.get(HEARTBEAT_ATTR, float("-inf")) > self._grace_period]

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


def open_storage(spec: StorageSpec, heartbeat_seconds: int, on_repair: Callable[[str], None] | None = None,
                 claim: contextlib.AbstractContextManager | None = None) -> BaseStorage:
    """The storage with heartbeats every ``heartbeat_seconds`` (stale after 3x that) and killed trials retried;
    a database's tables are created under ``claim`` (the claim lock) when given."""
    with warnings.catch_warnings():  # experimental since Optuna 2.8, and the documented way to retry
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    grace = 3 * heartbeat_seconds
    if spec.journal is not None:
        backend, note = journal_backend(spec.journal)
        if note and on_repair:
            on_repair(note)
        with no_space_left(spec.journal):
            return HeartbeatJournalStorage(backend, heartbeat_seconds, grace, retry)
    _check_driver(spec)
    import sqlalchemy.exc

    kwargs: dict = {"pool_pre_ping": True, **_connect_args(spec)}
    if spec.local_file() is not None:
        spec.local_file().parent.mkdir(parents=True, exist_ok=True)
    try:
        with claim or contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(spec.url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds,
                                              grace_period=grace, heartbeat_stale_trial_callback=retry)
    except sqlalchemy.exc.OperationalError as error:
        raise _unreachable(spec, error) from None


def _connect_args(spec: StorageSpec) -> dict:
    if spec.dialect == "postgresql":
        return {"connect_args": {"connect_timeout": 10}}
    if spec.dialect == "sqlite":
        return {"connect_args": {"timeout": 60}}  # workers wait for each other's writes instead of failing
    return {}


def _unreachable(spec: StorageSpec, error: Exception) -> UserError:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    return UserError(FLAG, f"cannot connect to {spec.describe()} ({reason[0] if reason else type(error).__name__})",
                     "check that the database server is running and reachable from this host (host, port, firewall), "
                     "that the database exists (createdb) and the user and password are right")


def _lock_key(study_name: str) -> int:
    """A signed 64-bit key for the database's advisory lock, the same in every worker of one study."""
    return int.from_bytes(hashlib.sha256(f"quant-abliterate:{study_name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock_file = path.with_name(f".{path.name}.claim.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: the holder keeps it for one count-and-ask
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _database_lock(engine, spec: StorageSpec, key: int) -> Iterator[None]:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    try:
        connection = engine.connect()
    except OperationalError as error:
        raise _unreachable(spec, error) from None
    with connection:
        if spec.dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
        else:  # mysql
            name = f"qa-{key & 0xFFFFFFFFFFFF:x}"
            connection.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": name})
            try:
                yield
            finally:
                connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


def claim_lock(spec: StorageSpec, study_name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context in which one worker at a time counts the study's trials and takes the next one
    (and creates the database's tables: Optuna's schema setup is not safe against two processes at once)."""
    local = spec.local_file()
    if local is not None:
        return lambda: _file_lock(local)
    _check_driver(spec)
    import sqlalchemy

    engine = sqlalchemy.create_engine(spec.url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                                      **_connect_args(spec))
    key = _lock_key(study_name)
    return lambda: _database_lock(engine, spec, key)
