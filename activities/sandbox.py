"""The sandbox runner: one child process confined by bubblewrap, with limits and a report.

Code and command tools (``activities/tools/sandboxed.py``) never run in the worker's process
or with its rights. Each call gets:

* **no network** — a network namespace of its own (only a loopback nobody listens on),
  unless the tool's sandbox declares ``network=True`` (which the registry turns into the
  permission ``sandbox:network`` that only the policy can grant);
* **a read-only root made of ``/usr`` only** (plus the interpreter's prefix when it lives
  elsewhere) — the worker's checkout, home, ``/etc`` and credentials are not in it;
* **an ephemeral working directory** ``/sandbox``: a size-capped tmpfs, input files copied
  in, gone with the process (also when the worker crashes: it is a mount of the sandbox's
  own mount namespace); ``/tmp`` is another capped tmpfs;
* **rlimits** set by ``prlimit`` before ``bwrap`` starts: CPU seconds (per process),
  address space, processes, file size, open files, no core dumps;
* **its own uid** when the worker runs as root (a fresh one per call, so the process limit
  counts this call's processes only), new pid/ipc/uts/cgroup namespaces, no capabilities,
  no nested user namespaces, a new session (no terminal injection);
* **a wall-clock timeout** that kills the whole process group (and with it the pid
  namespace: its init dies, the kernel kills the rest);
* **an allow-list of executables** checked before anything starts;
* **a scrubbed environment**: ``bwrap`` itself is started with only ``PATH``, ``HOME``,
  ``LANG`` and the credentials the tool declares, so not even ``/proc/1/environ`` in the
  sandbox shows the worker's environment;
* **capped, redacted output** (secrets, PII, and the declared credentials' values).

The result carries the exit status and the resource use from ``wait4``.

Blocking work runs in a thread (``asyncio.to_thread``) so the worker's event loop keeps
heartbeating; ``preexec_fn`` is never used (it is unsafe in a threaded process): the uid
change is ``Popen(user=...)`` and the limits are ``prlimit``'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.activities.guardrails import redact
from keel.errors import KeelError

__all__ = [
    "SANDBOX_WORKDIR",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "SandboxSpec",
    "bwrap_path",
    "run_sandboxed",
    "run_sandboxed_sync",
    "sandbox_available",
    "sandbox_python",
]

log = logging.getLogger(__name__)

SANDBOX_WORKDIR = "/sandbox"
"""The working directory inside the sandbox (a tmpfs)."""
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_UID_BASE = 1_600_000_000
"""Fresh uids are drawn above this (no such user exists; nothing on the host is owned by it)."""
_UID_SPAN = 100_000_000


class SandboxError(KeelError):
    """The sandbox refused the call before starting it (bad executable, bad input file)."""


class SandboxLimits(BaseModel):
    """Limits of one sandboxed call. Defaults suit a short data snippet or a command."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_seconds: int = Field(default=5, ge=1, le=600)
    """RLIMIT_CPU of every process in the sandbox (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = Field(default=512, ge=32, le=16384)
    """RLIMIT_AS (address space) of every process, in MiB."""
    max_processes: int = Field(default=32, ge=1, le=4096)
    """RLIMIT_NPROC: processes and threads of the sandbox's own uid (a fork bomb stops here)."""
    file_size_mb: int = Field(default=8, ge=1, le=4096)
    """RLIMIT_FSIZE: the largest file a process may write, in MiB."""
    open_files: int = Field(default=64, ge=16, le=65536)
    """RLIMIT_NOFILE."""
    disk_mb: int = Field(default=64, ge=1, le=4096)
    """Size of the working-directory tmpfs (and of ``/tmp``), in MiB."""
    wall_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Wall-clock timeout; then the process group is killed."""
    output_bytes: int = Field(default=16384, ge=256, le=1 << 20)
    """Bytes kept of stdout and of stderr each; the rest is read and dropped."""
    network: bool = False
    """Share the host's network. Off by default; on only where the policy grants it."""


class SandboxSpec(BaseModel):
    """The ``sandbox=`` option of ``@tool``: how the tool's child processes are confined."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    executables: tuple[str, ...]
    """Programs the tool may start (names looked up on the sandbox's PATH, or absolute)."""
    limits: SandboxLimits = SandboxLimits()
    credentials: tuple[str, ...] = ()
    """Names of worker environment variables passed in; nothing else of the worker's env is."""


class SandboxResult(BaseModel):
    """What happened: exit status, output, and resource use."""

    model_config = ConfigDict(frozen=True)

    exit_code: int
    """The program's exit code; ``128 + N`` when signal N ended it (bwrap's convention)."""
    status: Literal["ok", "error", "timeout", "cpu_limit", "killed"]
    """``ok`` exit 0; ``error`` other exit codes; ``timeout`` wall clock; ``cpu_limit``
    SIGXCPU or SIGKILL after the CPU limit; ``killed`` another signal."""
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_seconds: float = 0.0
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    max_rss_kb: int = 0
    """Peak resident set of the largest process (``ru_maxrss``). Linux also counts the
    launcher's footprint at exec (a fork of the worker), so read it as an upper bound."""
    uid: int = 0
    """The host uid the sandbox ran as."""


# ---------------------------------------------------------------------------- discovery
def bwrap_path() -> str | None:
    """The bubblewrap binary: ``KEEL_SANDBOX_BWRAP`` or ``bwrap`` on PATH."""
    configured = os.environ.get("KEEL_SANDBOX_BWRAP", "").strip()
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=4)
def _probe(bwrap: str | None, prlimit: str | None) -> str:
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    if prlimit is None:
        return "prlimit (util-linux) is not installed"
    try:
        r = run_sandboxed_sync(
            ["true"], SandboxSpec(executables=("true",), limits=SandboxLimits(wall_seconds=10))
        )
    except (OSError, SandboxError) as e:
        return f"bwrap cannot start: {e}"
    if r.exit_code != 0:
        first = (r.stderr.strip().splitlines() or [f"exit {r.exit_code}"])[0]
        return f"bwrap cannot run here: {first[:200]}"
    return ""


def sandbox_available() -> tuple[bool, str]:
    """``(True, "")`` when a confined child can actually start here, else ``(False, why)``.

    Checked by running ``true`` in a full sandbox once per process: bwrap may be installed
    and still unable to create namespaces (a container without user namespaces).
    """
    why = _probe(bwrap_path(), shutil.which("prlimit"))
    return (not why, why)


def sandbox_python() -> str:
    """The interpreter ``run_python`` uses: ``KEEL_SANDBOX_PYTHON``, else the system's
    ``/usr/bin/python3`` (inside the read-only root), else this process's base interpreter."""
    configured = os.environ.get("KEEL_SANDBOX_PYTHON", "").strip()
    if configured:
        return configured
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    return str(Path(sys.base_prefix) / "bin" / "python3")


def _resolve(program: str) -> str | None:
    found = program if "/" in program else shutil.which(program, path=_SANDBOX_PATH)
    if found is None or not os.access(found, os.X_OK):
        return None
    return os.path.realpath(found)


def _allowed(argv0: str, executables: Sequence[str]) -> str:
    """The real path of ``argv0`` if it is one of ``executables``; refuses anything else."""
    target = _resolve(argv0)
    allowed = {p for p in (_resolve(e) for e in executables) if p is not None}
    if target is None or target not in allowed:
        names = ", ".join(sorted(os.path.basename(e) for e in executables)) or "nothing"
        raise SandboxError(f"executable {argv0!r} is not allowed here (allowed: {names})")
    return target


# ---------------------------------------------------------------------------- the run
def _uid() -> tuple[int, int | None]:
    """The uid to run as and the RLIMIT_NPROC base to add to the limit.

    As root every call gets a fresh uid, so the process limit counts this call alone. Not
    as root the sandbox runs as the worker's uid, whose existing tasks (threads count) are
    added to the limit: a weaker bound, documented in the README.
    """
    if os.geteuid() == 0:
        return _UID_BASE + secrets.randbelow(_UID_SPAN), None
    uid = os.getuid()
    return uid, _tasks_of(uid)


def _tasks_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _root_binds(interpreter_prefix: str | None, network: bool) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):
        p = Path("/") / top
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]
    if network:
        for f in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates"):
            args += ["--ro-bind-try", f, f]
    if interpreter_prefix and not interpreter_prefix.startswith("/usr/"):
        args += ["--ro-bind", interpreter_prefix, interpreter_prefix]
    return args


def _text(parts: list[bytes], secrets_: Sequence[str]) -> str:
    # NUL spelled out: PostgreSQL text and jsonb (the recorded effect) cannot hold it.
    text = b"".join(parts).decode("utf-8", errors="replace").replace("\x00", "\\x00")
    for value in secrets_:
        if len(value) >= 4:
            text = text.replace(value, "[REDACTED:credential]")
    return redact(text)


def run_sandboxed_sync(
    argv: Sequence[str],
    spec: SandboxSpec,
    *,
    files: Mapping[str, bytes | str] | None = None,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> SandboxResult:
    """Run ``argv`` confined by ``spec``; blocks until it ends. See the module docstring.

    ``files`` (name → content) are copied into the working directory first; ``env`` is the
    worker environment the declared credentials are taken from (default ``os.environ``).
    Setting ``cancel`` kills the run early (the activity was cancelled).
    """
    if not argv:
        raise SandboxError("nothing to run")
    bwrap, prlimit = bwrap_path(), shutil.which("prlimit")
    if bwrap is None or prlimit is None:
        raise SandboxError("the sandbox needs bwrap and prlimit, and this worker lacks one")
    program = _allowed(argv[0], spec.executables)
    lim = spec.limits
    source = os.environ if env is None else env
    child_env = {
        "PATH": _SANDBOX_PATH,
        "HOME": SANDBOX_WORKDIR,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
    declared = {name: source[name] for name in spec.credentials if name in source}
    child_env.update(declared)
    uid, nproc_base = _uid()
    nproc = lim.max_processes + (nproc_base or 0)
    mib = 1 << 20
    limits = [
        f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 1}",
        f"--as={lim.memory_mb * mib}",
        f"--nproc={nproc}",
        f"--fsize={lim.file_size_mb * mib}",
        f"--nofile={lim.open_files}",
        "--core=0",
    ]
    prefix = None
    if not program.startswith("/usr/"):
        prefix = str(Path(program).parent.parent)
    bw = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        *(["--share-net"] if lim.network else []),
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--cap-drop",
        "ALL",
        "--hostname",
        "sandbox",
        *_root_binds(prefix, lim.network),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(lim.disk_mb * mib),
        "--tmpfs",
        "/tmp",
        "--size",
        str(lim.disk_mb * mib),
        "--perms",
        "0700",
        "--tmpfs",
        SANDBOX_WORKDIR,
    ]
    staged: list[int] = []
    stage_dir = tempfile.mkdtemp(prefix="keel-sandbox-in-")
    try:
        for name, content in (files or {}).items():
            if not name or "/" in name or name in (".", "..") or len(name) > 100:
                raise SandboxError(f"input file name {name!r} must be a plain file name")
            data = content.encode() if isinstance(content, str) else content
            path = Path(stage_dir, name)
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            staged.append(fd)
            bw += ["--perms", "0600", "--file", str(fd), f"{SANDBOX_WORKDIR}/{name}"]
        # bwrap builds the root on a tmpfs of its own; made read-only last, after every mount
        # point exists, so nothing but /sandbox and /tmp (both size-capped) is writable.
        bw += ["--remount-ro", "/", "--chdir", SANDBOX_WORKDIR, "--", program, *argv[1:]]
        return _run([prlimit, *limits, "--", *bw], uid, child_env, staged, lim, declared, cancel)
    finally:
        for fd in staged:
            os.close(fd)
        shutil.rmtree(stage_dir, ignore_errors=True)


def _run(
    cmd: list[str],
    uid: int,
    env: dict[str, str],
    fds: list[int],
    lim: SandboxLimits,
    declared: Mapping[str, str],
    cancel: threading.Event | None,
) -> SandboxResult:
    as_other = uid != os.getuid()
    as_user: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if as_other else {}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
        close_fds=True,
        pass_fds=fds,
        start_new_session=True,
        **as_user,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    out_cut, err_cut = [False], [False]
    readers = [
        threading.Thread(target=_capped, args=(proc.stdout, lim.output_bytes, out, out_cut), daemon=True),
        threading.Thread(target=_capped, args=(proc.stderr, lim.output_bytes, err, err_cut), daemon=True),
    ]
    for t in readers:
        t.start()
    waited: dict[str, object] = {}
    done = threading.Event()

    def wait() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        waited["status"], waited["usage"] = status, usage
        done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    timed_out = False
    deadline = started + lim.wall_seconds
    while not done.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
            timed_out = True
            _kill_group(proc.pid)
            done.wait()
            break
    wall = time.monotonic() - started
    proc.returncode = 0  # reaped by wait4 above; keeps Popen from waiting again
    for t in readers:
        t.join(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    status = int(waited["status"])  # type: ignore[call-overload]
    usage = waited["usage"]
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # bwrap itself was signalled (our timeout kill)
        code = 128 - code
    kind: Literal["ok", "error", "timeout", "cpu_limit", "killed"]
    cpu = usage.ru_utime + usage.ru_stime  # type: ignore[attr-defined]
    if timed_out:
        kind = "timeout"
    elif code == 0:
        kind = "ok"
    elif code == 128 + signal.SIGXCPU or (code == 128 + signal.SIGKILL and cpu >= lim.cpu_seconds * 0.9):
        kind = "cpu_limit"
    elif code > 128:
        kind = "killed"
    else:
        kind = "error"
    values = tuple(declared.values())
    return SandboxResult(
        exit_code=code,
        status=kind,
        stdout=_text(out, values),
        stderr=_text(err, values),
        stdout_truncated=out_cut[0],
        stderr_truncated=err_cut[0],
        wall_seconds=round(wall, 3),
        cpu_user_seconds=round(usage.ru_utime, 3),  # type: ignore[attr-defined]
        cpu_system_seconds=round(usage.ru_stime, 3),  # type: ignore[attr-defined]
        max_rss_kb=int(usage.ru_maxrss),  # type: ignore[attr-defined]
        uid=uid,
    )


def _capped(stream: object, cap: int, out: list[bytes], cut: list[bool]) -> None:
    """Read ``stream`` to its end, keeping the first ``cap`` bytes: the child never blocks
    on a full pipe, and a flood costs the worker no memory."""
    kept = 0
    read = stream.read1 if hasattr(stream, "read1") else stream.read  # type: ignore[attr-defined]
    while chunk := read(65536):
        if kept < cap:
            out.append(chunk[: cap - kept])
        if kept + len(chunk) > cap:
            cut[0] = True
        kept += len(chunk)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@functools.lru_cache(maxsize=1)
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """Sandboxes wait in threads of their own: in the loop's default executor, a few slow
    ones would starve everything else that uses it (``getaddrinfo`` for new connections)."""
    size = int(os.environ.get("KEEL_SANDBOX_CONCURRENCY", "") or 8)
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, size), thread_name_prefix="keel-sandbox")


async def run_sandboxed(
    argv: Sequence[str],
    spec: SandboxSpec,
    *,
    files: Mapping[str, bytes | str] | None = None,
    env: Mapping[str, str] | None = None,
) -> SandboxResult:
    """:func:`run_sandboxed_sync` in a thread; cancelling the caller kills the sandbox.

    At most ``KEEL_SANDBOX_CONCURRENCY`` (default 8) sandboxes run at once per worker; more
    wait their turn (their wall clock starts when they start)."""
    cancel = threading.Event()
    run = functools.partial(run_sandboxed_sync, argv, spec, files=files, env=env, cancel=cancel)
    task = asyncio.get_running_loop().run_in_executor(_executor(), run)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([task])
        raise
