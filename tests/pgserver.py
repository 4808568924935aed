"""A throw-away PostgreSQL server for the tests: initdb in a temporary folder, started
with pg_ctl, listening only on a Unix socket there (no TCP port), stopped at the end.

Debian's `postgresql` package (`make postgres`) puts the server's programs in
/usr/lib/postgresql/<version>/bin. initdb and postgres refuse to run as root: as root
they run as Debian's `postgres` system user (runuser), in a folder of their own under
/tmp that user owns (the pytest folders under /tmp/pytest-of-root are 0700, closed to it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "ispf"
PORT = 5432
RUN_AS_ROOT_USER = "postgres"  # the system user Debian's package creates
# A Unix socket's path (sun_path) holds 107 bytes: the folder, "/" and ".s.PGSQL.5432".
_SOCKET_DIR_MAX = 90

SETTINGS: dict[str, str] = {
    "listen_addresses": "''",
    "port": str(PORT),
    "max_connections": "200",  # several nodes, each with a pool
    "shared_buffers": "'128MB'",
    # A throw-away server: durability buys nothing here.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name)) or (0,)


def _has_bins(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: $ISPF_PG_BIN where set, else Debian's
    highest /usr/lib/postgresql/<version>/bin, else the one on PATH; None if none."""
    env = os.environ.get("ISPF_PG_BIN")
    if env:
        return Path(env) if _has_bins(Path(env)) else None
    if DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in DEBIAN_ROOT.iterdir() if _has_bins(p / "bin")),
            key=_version_key,
            reverse=True,
        )
        if versions:
            return versions[0] / "bin"
    initdb = shutil.which("initdb")
    if initdb is not None:
        folder = Path(initdb).resolve().parent
        if _has_bins(folder):
            return folder
    return None


class PgServerError(RuntimeError):
    """initdb or pg_ctl failed; the message carries what they wrote."""


def _clean_env() -> dict[str, str]:
    # PGHOST, PGDATA, PGPORT and the like from the caller's shell must not steer the
    # test server or its clients.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PgServer:
    """One running server. `PgServer.start(root)`; `.url(db)`, `.create_database(name)`,
    `.drop_database(name)`; `.stop()` (idempotent, also run at interpreter exit)."""

    def __init__(
        self,
        bindir: Path,
        data: Path,
        socket_dir: Path,
        log: Path,
        run_as: str | None,
        owned: Sequence[Path],
    ) -> None:
        self.bindir = bindir
        self.data = data
        self.socket_dir = socket_dir
        self.log = log
        self.run_as = run_as
        self.user = SUPERUSER
        self.port = PORT
        self._owned = list(owned)  # folders outside `root` this server made; removed at stop
        self._running = False

    @classmethod
    def start(cls, root: Path, bindir: Path | None = None) -> PgServer:
        """initdb and start a server for `root` (a fresh folder); raises PgServerError."""
        bindir = bindir or find_bin()
        if bindir is None:
            raise PgServerError("PostgreSQL is not installed (no initdb/pg_ctl found)")
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        owned: list[Path] = []
        run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(RUN_AS_ROOT_USER)
            except KeyError:
                raise PgServerError(
                    f"running as root, and initdb refuses root: no {RUN_AS_ROOT_USER!r}"
                    " system user to run it as (Debian's postgresql package creates one)"
                ) from None
            run_as = RUN_AS_ROOT_USER
            base = Path(tempfile.mkdtemp(prefix="ispf-pg-"))  # 0700, then the user's
            owned.append(base)
            os.chown(base, pw.pw_uid, pw.pw_gid)
            data, socket_dir, log = base / "data", base, base / "postgres.log"
        else:
            data, log = root / "data", root / "postgres.log"
            socket_dir = root
            if len(str(socket_dir)) > _SOCKET_DIR_MAX:
                socket_dir = Path(tempfile.mkdtemp(prefix="ispf-pg-"))
                owned.append(socket_dir)
        server = cls(bindir, data, socket_dir, log, run_as, owned)
        try:
            server._initdb()
            server._configure()
            server._pg_ctl("start", "-w", "-t", "60", "-l", str(log))
        except BaseException:
            server._running = True  # (a half-started server: stop tries, then cleans up)
            with contextlib.suppress(PgServerError):  # (the first error is the one to see)
                server.stop()
            raise
        server._running = True
        atexit.register(server.stop)
        return server

    # --- the programs -------------------------------------------------------------

    def _cmd(self, program: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / program), *args]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return cmd

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(program, *args)
        # cwd: a folder the server's user can enter (root's own may be closed to it).
        proc = subprocess.run(
            cmd,
            cwd=self.data.parent,
            env=_clean_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise PgServerError(
                f"{program} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"--- stderr ---\n{proc.stderr.strip()}\n--- stdout ---\n{proc.stdout.strip()}"
                + self._log_tail()
            )
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- server log ---\n" + "\n".join(text) if text else ""

    def _initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "--locale=C",
            "--encoding=UTF8",
            "--auth=trust",
            "-U",
            self.user,
            "--no-sync",
        )

    def _configure(self) -> None:
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.socket_dir}'"}
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        # initdb made the file as the server's user; root may append to it as it is.
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# tests/pgserver.py\n" + lines)

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    # --- the API ------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        """A libpq URL for `dbname` on this server (over its Unix socket)."""
        host = quote(str(self.socket_dir), safe="/")
        return (
            f"postgresql:///{quote(dbname, safe='')}?host={host}&port={self.port}&user={self.user}"
        )

    def _admin(self, statement: str, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))

    def create_database(self, name: str) -> str:
        """Create database `name` (it must not exist); its URL."""
        self._admin("CREATE DATABASE {}", name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, closing whatever connections are left on it."""
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def stop(self) -> None:
        """pg_ctl stop -m fast; then remove the folders made outside `root`. Idempotent."""
        if self._running:
            self._running = False
            if (self.data / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        for folder in self._owned:
            shutil.rmtree(folder, ignore_errors=True)
        self._owned.clear()
