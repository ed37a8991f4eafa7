"""Servers tests start themselves from what is installed on the machine (each test that needs
one skips, saying what is missing, where it is not). The fixtures are offered to every test by
tests/conftest.py.

- ``postgres``: a real PostgreSQL (initdb + pg_ctl) for the module, as a DuckLake metadata
  connection string ``postgres:dbname=awm_catalog host=127.0.0.1 port=... user=awm``.
- ``pg_database``: a factory of fresh, empty databases on that server (a libpq keyword DSN).
- ``s3_server``: a moto S3 server on loopback for the module, with a bucket ``awm-lake``.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.server import free_port, stop_group


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; "
                    "install the postgresql package to run this test")
    prefix: list[str] = []
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's service account
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        user = pw.pw_name
        prefix = ["runuser", "-u", user, "--"]
    # Outside pytest's private (0700) temp tree, so the service account can reach it.
    root = Path(tempfile.mkdtemp(prefix="awm-pg-"))
    data = root / "data"
    if user:
        shutil.chown(root, user=user)
    port = free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(initdb, "-D", str(data), "-A", "trust", "-U", "awm", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr[-500:]}")
    r = run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if r.returncode != 0:
        pytest.fail(f"pg_ctl start failed: {r.stderr[-500:]} {(root / 'server.log').read_text()[-1000:]}")
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            r = subprocess.run([pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "awm",
                                "awm_catalog"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"createdb failed: {r.stderr}")
        yield f"postgres:dbname=awm_catalog host=127.0.0.1 port={port} user=awm"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    key_id: str = "awm-test-key"
    secret: str = "awm-test-secret-value"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def env(self, prefix: str) -> dict[str, str]:
        """Environment of a process using the catalog with its data under s3://bucket/prefix."""
        return {"AWM_CATALOG__DATA_PATH": f"s3://{self.bucket}/{prefix}",
                "AWM_CATALOG__OBJECT_STORE__ENDPOINT": self.endpoint,
                "AWM_CATALOG__OBJECT_STORE__URL_STYLE": "path",
                "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret}


@pytest.fixture(scope="module")
def s3_server():
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed (the dev extra: pip install -e '.[dev]'); "
                    "it plays the S3-compatible object store")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"moto server did not start: {proc.stderr.read().decode()[-1000:]}")
                time.sleep(0.2)
        server = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket="awm-lake")
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop_group(proc, timeout=10)


@pytest.fixture
def pg_database(postgres):
    """A factory of fresh databases on the module's server, so tests sharing it start empty."""
    port = postgres.split("port=")[1].split()[0]
    made = 0

    def make(name: str) -> str:
        nonlocal made
        made += 1
        db = f"{name}_{os.getpid()}_{made}"
        r = subprocess.run([pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", port, "-U", "awm", db],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"createdb {db} failed: {r.stderr}")
        return f"dbname={db} host=127.0.0.1 port={port} user=awm"

    return make
