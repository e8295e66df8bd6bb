"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, on loopback, stopped afterwards.

CI installs PostgreSQL (.ci/run); a test that needs it fails when it is missing, unless
QA_SKIP_POSTGRES=1 is set (for developers without PostgreSQL: the test is then skipped, saying so).
PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user (created by the
Debian package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SKIP_VARIABLE = "QA_SKIP_POSTGRES"


def _binaries() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").is_file() and Path(candidate, "pg_ctl").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and Path(initdb).with_name("pg_ctl").is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _require() -> Path:
    binaries = _binaries()
    if binaries is None:
        message = ("PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH): "
                   "apt-get install -y postgresql (.ci/run does), or set QA_SKIP_POSTGRES=1 to skip these tests")
        if os.environ.get(SKIP_VARIABLE) == "1":
            pytest.skip(message)
        pytest.fail(message)
    return binaries


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the URL of an empty database ``qa`` on a fresh server."""
    binaries = _require()
    root = Path(tempfile.mkdtemp(prefix="qa-postgres-"))
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    if as_root:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)

    def run(*command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        result = subprocess.run([*prefix, *command], check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")

    data, port = root / "data", _free_port()
    run(str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
        f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "qa")
        yield f"postgresql://{user}@127.0.0.1:{port}/qa"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
