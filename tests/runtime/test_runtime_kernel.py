"""The kernel layers hold against code that first switches off the in-process guard, for
root and for an ordinary user: no connection, no write outside the scratch folder, no
secret, no signal, no new process. And a machine without them is refused unless allowed.

Each mode runs ``kernel_escape_driver.py`` as its own process (the pool's parent, with a
secret in its environment from exec). Run as root, the unprivileged mode drops to
``nobody`` with an interpreter that user can read (a virtual environment over this one's
packages when this interpreter lives in a private home folder).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from awm_core.runtime import SandboxPool, WeakSandboxError, kernel

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SECRET = "awm-parent-secret-7f3c9e"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel layers are Linux-only")
pytestmark = linux_only


def _runs_as_nobody(python: str) -> bool:
    try:
        # setpriv itself may still resolve a path root alone can reach: the pool's own exec
        # of its workers is the real test.
        probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import awm_core.runtime.pool'], check=True)"
        return subprocess.run([*NOBODY, python, "-c", probe], cwd="/",
                              env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def nobody_python(tmp_path_factory) -> str:
    """An interpreter with this environment's packages that ``nobody`` can run."""
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root (this run is itself unprivileged)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if _runs_as_nobody(sys.executable):
        yield sys.executable
        return
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for base in (shutil.which(want, path="/usr/bin:/usr/local/bin:/bin"), "/usr/bin/python3"):
        if not base:
            continue
        probe = subprocess.run([base, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.stdout.strip() != want[6:]:
            continue
        venv = Path(tempfile.mkdtemp(prefix="awm-nobody-python-"))  # pytest's own tmp root is private
        venv.chmod(0o755)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv / "py")], check=True)
        site = next((venv / "py" / "lib").glob("python*/site-packages"))
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        (site / "project-packages.pth").write_text("\n".join(paths) + "\n")
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
        python = str(venv / "py" / "bin" / "python")
        if _runs_as_nobody(python):
            yield python
            shutil.rmtree(venv, ignore_errors=True)
            return
        shutil.rmtree(venv, ignore_errors=True)
    pytest.skip(f"no {want} interpreter readable by an unprivileged user (this one lives in a private folder "
                f"and no system {want} is installed), or this checkout is not readable by other users")


def _drive(prefix: list[str], python: str, *extra: str) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "AWM_TEST_SECRET": SECRET,
           "LANG": "C.UTF-8"}
    out = subprocess.run([*prefix, python, str(HERE / "kernel_escape_driver.py"), *extra], cwd="/", env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["root", "unprivileged"])
def report(request):
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("this run is not root")
        return _drive([], sys.executable)
    if os.geteuid() != 0:
        return _drive([], sys.executable)
    return _drive(NOBODY, request.getfixturevalue("nobody_python"))


CASES = ["raw_socket_tcp", "ctypes_connect", "unix_socket_connect", "ctypes_execve", "raw_syscall_shellcode",
         "fork", "subprocess_via_posixsubprocess", "parent_environ", "ssh_key", "write_next_to_catalog",
         "proc_self_mem", "mmap_outside_file", "thread_outlives_call", "signal_parent", "ptrace_parent"]


def test_every_layer_is_in_force(report):
    p = report["protections"]
    assert p["landlock"] >= 1 and p["seccomp"] and p["network_namespace"], p
    assert p["separate_uid"] if report["uid"] == 0 else p["user_namespace"], p
    # The probes below really run with the audit hook off.
    assert report["cases"]["disarm_works"]["result"] == json.dumps("disarmed"), report["cases"]["disarm_works"]


@pytest.mark.parametrize("case", CASES)
def test_escape_is_contained(report, case):
    r = report["cases"][case]
    assert "ESCAPED" not in (r["result"] or ""), r
    assert SECRET not in (r["result"] or ""), r
    assert not r["events"], r          # no connection, no signal reached the parent
    assert not r["canary"], r          # nothing written outside the scratch folder
    assert report["still_serves"]


def test_probes_catch_an_escape_when_the_layers_are_off(nobody_python):
    """The same probes without the kernel layers (as an ordinary user): they do get out,
    so the containment above is the layers' doing."""
    weak = _drive(NOBODY, nobody_python, "--weak")
    escaped = {name for name, r in weak["cases"].items() if "ESCAPED" in (r["result"] or "") or r["events"]
               or r["canary"] or SECRET in (r["result"] or "")}
    assert {"raw_socket_tcp", "write_next_to_catalog", "parent_environ", "signal_parent"} <= escaped, weak


def test_hostile_suite_as_an_unprivileged_user(nobody_python):
    """The audit-hook suite, every case, with the pool's parent an ordinary user."""
    tmp_path = Path(tempfile.mkdtemp(prefix="awm-nobody-run-"))
    tmp_path.chmod(0o777)
    out = subprocess.run(
        [*NOBODY, nobody_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-o", f"cache_dir={tmp_path}", str(HERE / "test_runtime_hostile.py")],
        cwd=str(tmp_path), env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
                                "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_missing_layers_are_refused_with_what_is_missing():
    with SandboxPool(workers=1, landlock=False, seccomp=False) as pool:
        with pytest.raises(WeakSandboxError, match="Landlock.*seccomp.*--allow-weak-sandbox"):
            pool.load(_notes())
    with SandboxPool(workers=1, landlock=False, seccomp=False, allow_weak_sandbox=True) as pool:
        with pool.load(_notes()).open_session() as s:
            assert s.call("list_notes", {}).ok
        assert pool.stats()["workers"][0]["protections"]["seccomp"] is False


def test_missing_layers_name_each_one():
    assert kernel.missing_layers({"landlock": 7, "seccomp": True}) == []
    assert [m.split(" ")[0] for m in kernel.missing_layers({"landlock": 0, "seccomp": True})] == ["Landlock"]


def _notes():
    sys.path.insert(0, str(HERE))
    from runtime_envs import notes_environment

    return notes_environment(env_id="weak")
