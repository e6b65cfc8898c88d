"""The sandbox, attacked: each limit is tried by code that would break it if it were absent.

Every hostile test has a control beside it (the same code with the limit lifted, or a
harmless variant) so that a test cannot pass because the snippet never worked. These run
real bubblewrap children; they skip, with the reason, where bubblewrap cannot run.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keel.activities.sandbox import (
    SandboxError,
    SandboxLimits,
    SandboxSpec,
    run_sandboxed,
    run_sandboxed_sync,
    sandbox_available,
    sandbox_python,
)
from keel.settings import PROJECT_ROOT

_OK, _WHY = sandbox_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"sandbox unavailable here: {_WHY}")

PY = sandbox_python()


def spec(**limits: object) -> SandboxSpec:
    base: dict[str, object] = {"cpu_seconds": 2, "wall_seconds": 10, "memory_mb": 256, "max_processes": 16}
    return SandboxSpec(executables=(PY, "ls", "cat", "echo"), limits=SandboxLimits(**{**base, **limits}))


def py(code: str, s: SandboxSpec | None = None, **kw: object):  # type: ignore[no-untyped-def]
    return run_sandboxed_sync([PY, "-I", "-c", code], s or spec(), **kw)  # type: ignore[arg-type]


def _uid_processes(uid: int, settle_s: float = 5.0) -> list[int]:
    """Live (non-zombie) processes of ``uid``, after up to ``settle_s`` for teardown: the
    kernel kills a pid namespace's members asynchronously once its init has died."""
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.stat(entry.path).st_uid == uid:
                        state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                        if state not in ("Z", "X"):
                            found.append(int(entry.name))
                except (OSError, IndexError):
                    continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_normal_snippet_runs_and_reports_resource_use() -> None:
    r = py(
        "import time, json\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
        "print(json.load(open('data.json'))['n'] * 2)",
        files={"data.json": '{"n": 21}'},
    )
    assert r.status == "ok" and r.exit_code == 0, r
    assert r.stdout.strip() == "42"
    assert r.cpu_user_seconds + r.cpu_system_seconds >= 0.25, r
    assert r.max_rss_kb > 1000 and r.wall_seconds >= 0.3


def test_fork_bomb_stops_at_the_process_limit_and_leaves_nothing_behind() -> None:
    counted = py(
        "import os, time\nn = 0\nfor _ in range(200):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(5); os._exit(0)\n    n += 1\nprint(n)",
        spec(max_processes=8),
    )
    assert counted.status == "ok", counted
    assert 0 < int(counted.stdout) < 8, counted.stdout
    # Control: twenty processes one after another fit, so the limit is what stopped the above.
    control = py("import os\nfor _ in range(20):\n    os.fork() or os._exit(0)\n    os.wait()\nprint(20)")
    assert control.stdout.strip() == "20", control

    started = time.monotonic()
    bomb = py(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        spec(max_processes=8, cpu_seconds=1, wall_seconds=4),
    )
    assert bomb.status in ("timeout", "cpu_limit"), bomb
    assert time.monotonic() - started < 8
    assert _uid_processes(bomb.uid) == [], "fork bomb processes survived the sandbox"


def test_memory_hog_is_stopped_by_the_memory_limit() -> None:
    hog = "x = []\nwhile True:\n    x.append(bytearray(8 * 1024 * 1024))"
    r = py(hog, spec(memory_mb=128))
    assert r.status == "error" and "MemoryError" in r.stderr, r
    # ru_maxrss also counts the launching process's footprint at exec (the fork of this big
    # test process), so it is an upper bound: the limit plus that footprint.
    assert r.max_rss_kb < 128 * 1024 + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, r
    control = py("x = bytearray(64 * 1024 * 1024); print(len(x))", spec(memory_mb=256))
    assert control.status == "ok" and control.max_rss_kb > 60 * 1024, control


def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    r = py("while True:\n    pass", spec(cpu_seconds=1, wall_seconds=30))
    assert r.status == "cpu_limit", r
    assert r.cpu_user_seconds + r.cpu_system_seconds >= 0.9
    assert r.wall_seconds < 15


def test_a_sleeping_program_is_killed_at_the_wall_clock_limit() -> None:
    started = time.monotonic()
    r = py("import time\ntime.sleep(600)", spec(wall_seconds=1.5))
    assert r.status == "timeout" and r.exit_code == 137, r
    assert 1.4 < time.monotonic() - started < 5
    assert _uid_processes(r.uid) == []


def _listener() -> tuple[socket.socket, list[bytes]]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got: list[bytes] = []

    def accept() -> None:
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
            got.append(conn.recv(100))
            conn.close()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    return srv, got


def test_no_network_unless_granted() -> None:
    srv, got = _listener()
    port = srv.getsockname()[1]
    connect = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "s.sendall(b'leak'); s.close(); print('connected')"
    )
    try:
        denied = py(connect)
        assert denied.status == "error" and "connected" not in denied.stdout, denied
        assert "ConnectionRefused" in denied.stderr or "unreachable" in denied.stderr, denied.stderr
        assert got == []
        granted = py(connect, spec(network=True))
        assert granted.stdout.strip() == "connected", granted
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"leak"]
    finally:
        srv.close()


def test_files_outside_the_working_directory_cannot_be_read() -> None:
    secret_file = PROJECT_ROOT / "pyproject.toml"
    assert secret_file.exists()
    probe = (
        "import os\nfor p in {!r}:\n    try:\n        open(p).read(); print('READ', p)\n"
        "    except OSError as e:\n        print('no', p, type(e).__name__)\n"
        "print(sorted(os.listdir('/')))"
    ).format(
        [str(secret_file), "/etc/passwd", "/etc/shadow", "/root/.bashrc", f"/proc/{os.getpid()}/environ"]
    )
    r = py(probe)
    assert r.status == "ok", r
    assert "READ" not in r.stdout, r.stdout
    top = r.stdout.strip().splitlines()[-1]
    assert "'sandbox'" in top and "'usr'" in top
    assert all(f"'{d}'" not in top for d in ("work", "root", "home", "var", "opt")), top
    control = py("print(open('mine.txt').read())", files={"mine.txt": "inside"})
    assert control.stdout.strip() == "inside"


def test_nothing_outside_the_working_directory_can_be_written(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    probe = (
        "for p in {!r}:\n    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except OSError as e:\n        print('no', p, type(e).__name__)\n"
        "open('/sandbox/ok.txt', 'w').write('fine'); open('/tmp/t.txt', 'w').write('fine')\n"
        "print(open('/sandbox/ok.txt').read())"
    ).format([str(target), "/usr/evil", "/etc/evil", "/evil", str(PROJECT_ROOT / "evil.txt")])
    r = py(probe)
    assert r.status == "ok", r
    assert "WROTE" not in r.stdout and r.stdout.strip().endswith("fine"), r.stdout
    assert not target.exists() and not (PROJECT_ROOT / "evil.txt").exists()
    again = py("import os\nprint(os.listdir('.'), os.listdir('/tmp'))")
    assert again.stdout.strip() == "[] []", "the working directory must not outlive a run"


def test_disk_and_file_size_and_open_file_limits() -> None:
    big = py("open('big', 'wb').write(b'x' * 4 * 1024 * 1024)", spec(file_size_mb=1, disk_mb=64))
    assert big.status == "error" and "File too large" in big.stderr, big
    full = py(
        "for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * 512 * 1024)",
        spec(file_size_mb=8, disk_mb=4),
    )
    assert full.status == "error" and "No space left" in full.stderr, full
    many = py("fs = [open('/dev/null') for _ in range(200)]", spec(open_files=32))
    assert many.status == "error" and "Too many open files" in many.stderr, many
    control = py(
        "open('big', 'wb').write(b'x' * 4 * 1024 * 1024); fs = [open('/dev/null') for _ in range(200)]",
        spec(file_size_mb=8, disk_mb=64, open_files=256),
    )
    assert control.status == "ok", control


def test_only_allow_listed_executables_start() -> None:
    s = SandboxSpec(executables=(PY,))
    for argv in (["sh", "-c", "id"], ["/bin/sh", "-c", "id"], ["/usr/bin/../bin/sh"], ["ls"], ["nope-xyz"]):
        with pytest.raises(SandboxError, match="not allowed"):
            run_sandboxed_sync(argv, s)
    assert run_sandboxed_sync(["echo", "hi"], spec()).stdout == "hi\n"


def test_the_worker_environment_does_not_reach_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_WORKER_SECRET", "worker-secret-value-123")
    monkeypatch.setenv("KEEL_DECLARED_TOKEN", "declared-token-value-456")
    probe = (
        "import os\nprint(sorted(os.environ))\n"
        "for p in ('/proc/self/environ', '/proc/1/environ', '/proc/2/environ'):\n"
        "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(p, e)\n"
        "ok = os.environ.get('KEEL_DECLARED_TOKEN') == 'declared-token-value-456'\n"
        "print('declared ok' if ok else 'missing')\n"
        "print(os.environ.get('KEEL_DECLARED_TOKEN'))"
    )
    s = SandboxSpec(executables=(PY,), credentials=("KEEL_DECLARED_TOKEN", "KEEL_NOT_SET"))
    r = py(probe, s)
    assert r.status == "ok", r
    assert "worker-secret-value-123" not in r.stdout + r.stderr
    assert "KEEL_WORKER_SECRET" not in r.stdout
    assert "declared ok" in r.stdout, r.stdout
    assert "declared-token-value-456" not in r.stdout, "a declared credential must be redacted from output"
    assert "[REDACTED:credential]" in r.stdout


def test_output_is_capped_and_redacted() -> None:
    key = "sk-" + "A1b2C3d4" * 5
    r = py(f"print({key!r}); print('x' * 1_000_000)", spec(output_bytes=4096))
    assert r.status == "ok" and r.stdout_truncated
    assert len(r.stdout) <= 4096
    assert key not in r.stdout and "REDACTED" in r.stdout


async def test_cancelling_the_caller_kills_the_sandbox() -> None:
    task = asyncio.create_task(
        run_sandboxed(
            [PY, "-I", "-c", "import time; print('up', flush=True); time.sleep(600)"], spec(wall_seconds=60)
        )
    )
    await asyncio.sleep(0.5)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 3


def test_a_worker_without_bwrap_refuses_sandboxed_tools_in_one_line() -> None:
    code = (
        "import logging; logging.basicConfig(format='%(message)s')\n"
        "from keel.activities.tools.loader import catalog\n"
        "names = {t.name for t in catalog()}\n"
        "assert 'run_python' not in names and 'run_command' not in names, names\n"
        "assert 'lookup_order' in names\n"
    )
    env = {**os.environ, "KEEL_SANDBOX_BWRAP": "/nonexistent/bwrap"}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == [
        "sandbox unavailable (bubblewrap (bwrap) is not installed): not registering run_command, run_python"
    ]


def _system_python_matches() -> bool:
    try:
        out = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return False
    return out == str(tuple(sys.version_info[:2]))


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not _system_python_matches(),
    reason="needs root (to become an unprivileged user), setpriv and /usr/bin/python3 of this version",
)
def test_an_unprivileged_worker_gets_the_same_confinement() -> None:
    """A worker not running as root sandboxes as its own uid: still no files of the host, and
    the process limit (added to the uid's current task count) still stops a fork loop."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    forks = (
        "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(2); os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    snoop = f"open({str(PROJECT_ROOT / 'pyproject.toml')!r})"
    code = (
        f"import site; site.addsitedir({site!r})\n"
        "from keel.activities.sandbox import *\n"
        "s = SandboxSpec(executables=(sandbox_python(),), limits=SandboxLimits(max_processes=8))\n"
        f"r = run_sandboxed_sync([sandbox_python(), '-I', '-c', {forks!r}], s)\n"
        f"q = run_sandboxed_sync([sandbox_python(), '-I', '-c', {snoop!r}], s)\n"
        "print(r.uid, r.status, r.stdout.strip(), q.status, 'FileNotFoundError' in q.stderr)\n"
    )
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{PROJECT_ROOT}:{site}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    uid, status, forked, q_status, not_found = p.stdout.split()
    assert (uid, status, q_status, not_found) == ("65534", "ok", "error", "True"), p.stdout
    assert 0 < int(forked) < 8, p.stdout
