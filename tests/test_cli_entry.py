"""The installed ``keel`` command: fast top-level help that stays in sync with the commands,
shell completion that really completes in bash, and ``keel --help`` from a fresh,
non-editable install outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from keel.cli import COMMANDS, build_parser
from keel.settings import PROJECT_ROOT

KEEL = Path(sys.executable).parent / "keel"


def _commands(parser) -> dict[str, str]:  # type: ignore[no-untyped-def]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {a.dest: a.help for a in sub._choices_actions}


def test_the_help_table_is_what_the_command_modules_register() -> None:
    full = _commands(build_parser())
    assert full == {name: help_ for name, (_, help_) in COMMANDS.items()}
    assert _commands(build_parser(light=True)) == full


def test_top_level_help_imports_no_sdk() -> None:
    code = (
        "import sys\nfrom keel.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "sdks = ('temporalio', 'psycopg', 'pydantic', 'httpx', 'yaml')\n"
        "heavy = sorted(m for m in sdks if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    for name in COMMANDS:
        assert name in out.stdout


def test_console_script_help_version_and_bad_command() -> None:
    ok = subprocess.run([str(KEEL), "--help"], capture_output=True, text=True, timeout=30, cwd="/tmp")
    assert ok.returncode == 0 and ok.stdout.startswith("usage: keel "), ok.stderr
    assert subprocess.run([str(KEEL), "--version"], capture_output=True, text=True).stdout.startswith("keel ")
    bad = subprocess.run([str(KEEL), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "invalid choice: 'frobnicate'" in bad.stderr
    sub = subprocess.run([str(KEEL), "run", "--help"], capture_output=True, text=True, timeout=30)
    assert sub.returncode == 0 and "--follow" in sub.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["keel", "bud"], {"budget"}),
        (["keel", "budget", "s"], {"set", "show"}),
        (["keel", "budget", "set", "--o"], {"--observe", "--overdraft", "--output"}),
        (["keel", "run", "--fo"], {"--follow"}),
        (["keel", "dev", ""], {"up", "down", "status", "--workers", "--json", "--output", "--help"}),
        (["keel", "tools", ""], {"list", "--help"}),
    ],
)
def test_bash_completion_completes(words: list[str], expected: set[str]) -> None:
    script = subprocess.run([str(KEEL), "completion", "bash"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    quoted = " ".join(f"'{w}'" for w in words)
    call = f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _keel_complete"
    probe = f'{script.stdout}\n{call}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert set(out.stdout.split()) == expected, out.stderr


def test_keel_help_from_a_fresh_install(tmp_path: Path) -> None:
    """A non-editable install into a new venv, run from outside the checkout: the console
    script, the package data and the lazy help all work from site-packages. (Dependencies
    come from this venv through a .pth file: nothing is downloaded.)"""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "worker.py", "starter.py"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    for pkg in ("keel", "workflows", "activities"):
        shutil.copytree(PROJECT_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # this venv's pip installs into it
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "keel-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    keel = env_dir / "bin" / "keel"
    out = subprocess.run([keel, "--help"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0 and "usage: keel" in out.stdout, out.stderr
    where = subprocess.run(
        [
            py,
            "-c",
            "import keel, keel.db as d, pathlib; print(keel.__file__); "
            "print(len(list((pathlib.Path(d.__file__).parent / 'migrations').glob('*.sql'))))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    assert where[0].startswith(site), where
    assert int(where[1]) >= 9  # the SQL migrations are installed with the package
