"""Credential hygiene (reliability 5.1 item 29): with DEBUG on for every logger and fake but
distinctive credentials in ``storage_options`` and in the environment, run save / restore /
verify / copy / the CLI / failing operations / a Ray save, and find no secret (nor the SSE-C
key's base64, hex or URL-quoted forms) in any log record, exception text, manifest, LATEST,
report, CLI output or argument ckpt sends to a Ray worker.

moto accepts SSE-C over plain http (it does not check the key), so the SSE-C key really travels
in every PutObject / GetObject / HeadObject request ckpt makes here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pytest
import torch

import ckpt
import ckpt.parallel.ray
from ckpt.storage import open_storage, redaction

OPT_KEY = "AKIAFAKEOPTKEY7Q3Z"
OPT_SECRET = "s3cr3t-XYZ-opt-4f1d9e0a7c"
OPT_TOKEN = "t0ken-XYZ-opt-8d2c6b1e5f"
ENV_KEY = "AKIAFAKEENVKEY2W8P"
ENV_SECRET = "s3cr3t-XYZ-env-93be17c4d0"
ENV_TOKEN = "t0ken-XYZ-env-51a0f7e3c2"
SSE_KEY = b"SSEC-XYZ-0123456789abcdefghij!#_"  # 32 bytes: an AES-256 customer key
assert len(SSE_KEY) == 32

_RAW = [OPT_KEY, OPT_SECRET, OPT_TOKEN, ENV_KEY, ENV_SECRET, ENV_TOKEN, SSE_KEY.decode()]
_SSE_FORMS = [
    base64.b64encode(SSE_KEY).decode(),
    base64.urlsafe_b64encode(SSE_KEY).decode(),
    SSE_KEY.hex(),
    SSE_KEY.hex().upper(),
]
SECRETS: list[str] = sorted(
    {*_RAW, *_SSE_FORMS, *(urllib.parse.quote(s, safe="") for s in [*_RAW, *_SSE_FORMS])}
)
ENV = {
    "AWS_ACCESS_KEY_ID": ENV_KEY,
    "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
    "AWS_SESSION_TOKEN": ENV_TOKEN,
}
SSE_KWARGS = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSE_KEY.decode()}

STATS = {"texts": 0, "records": 0, "chars": 0}  # what the module scanned (printed at the end)


def leaks(text: str | bytes) -> list[str]:
    """The secrets (or encoded forms) found in ``text``."""
    STATS["texts"] += 1
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    STATS["chars"] += len(text)
    return [s for s in SECRETS if s in text]


def assert_clean(what: str, text: str | bytes) -> None:
    found = leaks(text)
    assert not found, f"{what} holds secrets {found}: {text[:2000]!r}"


def exception_texts(err: BaseException) -> Iterator[str]:
    """Everything an exception shows: str, repr, args, notes, traceback, over every cause."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield str(e)
        yield repr(e)
        yield repr(e.args)
        yield "\n".join(getattr(e, "__notes__", []))
        yield "".join(traceback.format_exception_only(type(e), e))
        todo += [e.__cause__, e.__context__]
    yield "".join(traceback.format_exception(type(err), err, err.__traceback__))


def assert_clean_exception(what: str, err: BaseException) -> None:
    for text in exception_texts(err):
        assert_clean(f"{what} (exception)", text)


class _Keep(logging.Handler):
    """Keeps every record as its formatted text plus its raw args and exception text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[tuple[str, str]] = []
        self._ids: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self._ids:  # handlers on several loggers: one record once
            return
        self._ids.add(id(record))
        parts = [self.format(record), repr(record.args), repr(record.msg)]
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
        if record.stack_info:
            parts.append(record.stack_info)
        self.texts.append((record.name, "\n".join(parts)))


@pytest.fixture
def debug_logs() -> Iterator[_Keep]:
    """DEBUG on for the root and every logger known now (botocore, s3fs, fsspec, aiobotocore,
    urllib3, ray, ...); the handler sits on the root and on every logger that does not propagate."""
    import aiobotocore  # noqa: F401  (create their loggers before we set levels)
    import botocore.endpoint  # noqa: F401
    import s3fs  # noqa: F401
    import urllib3  # noqa: F401

    for name in (
        "botocore",
        "s3fs",
        "fsspec",
        "aiobotocore",
        "urllib3",
        "ray",
        "aiohttp",
        "asyncio",
    ):
        logging.getLogger(name)
    keep = _Keep()
    saved: list[tuple[logging.Logger, int, bool]] = []
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        saved.append((lg, lg.level, lg.disabled))
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        if lg is logging.getLogger() or not lg.propagate:
            lg.addHandler(keep)
    old_env = os.environ.get("S3FS_LOGGING_LEVEL")
    os.environ["S3FS_LOGGING_LEVEL"] = "DEBUG"
    try:
        yield keep
    finally:
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled
            if keep in lg.handlers:
                lg.removeHandler(keep)
        if old_env is None:
            os.environ.pop("S3FS_LOGGING_LEVEL", None)
        else:
            os.environ["S3FS_LOGGING_LEVEL"] = old_env


def check_logs(keep: _Keep, *, min_records: int) -> None:
    assert len(keep.texts) >= min_records, f"only {len(keep.texts)} records captured: is DEBUG on?"
    names = {n.split(".")[0] for n, _ in keep.texts}
    assert "botocore" in names  # the requests were logged: the check below means something
    for name, text in keep.texts:
        STATS["records"] += 1
        assert_clean(f"log record of {name}", text)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def _opts(endpoint: str, *, sse: bool = True) -> dict[str, Any]:
    o: dict[str, Any] = {
        "key": OPT_KEY, "secret": OPT_SECRET, "token": OPT_TOKEN,
        "endpoint_url": endpoint, "skip_instance_cache": True,
    }  # fmt: skip
    if sse:
        o["s3_additional_kwargs"] = dict(SSE_KWARGS)
    return o


def _bucket(endpoint: str) -> str:
    bucket = f"ckpt-secret-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", **_opts(endpoint, sse=False)).call_s3("create_bucket", Bucket=bucket)
    return bucket


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 8, generator=g),
        "b": torch.arange(8.0),
        "meta": {"lr": 0.1, "seed": seed},
    }


def _expect_error(what: str, fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as err:
        assert_clean_exception(what, err)
        return err
    raise AssertionError(f"{what}: expected an error")


@pytest.mark.s3
def test_no_secret_in_logs_errors_manifests_reports(
    s3_endpoint: str, tmp_path: Any, secret_env: None, debug_logs: _Keep
) -> None:
    bucket = _bucket(s3_endpoint)
    root = f"s3://{bucket}/run"
    opts = _opts(s3_endpoint)
    raw = fsspec.filesystem("s3", **opts)
    # the SSE-C key really travels with ckpt's requests (moto does not check it, but botocore
    # puts it in the headers it logs at DEBUG: what the redaction must catch)
    m1 = ckpt.save(root, _state(1), step=1, storage_options=opts, user_metadata={"run": "secrets"})
    m2 = ckpt.save(root, _state(2), step=2, storage_options=opts)
    for m in (m1, m2):
        assert_clean("Manifest repr", repr(m))
    back = ckpt.restore(root, storage_options=opts)
    assert torch.equal(back["w"], _state(2)["w"])
    assert ckpt.list_steps(root, storage_options=opts) == [1, 2]
    assert ckpt.latest_step(root, storage_options=opts) == 2
    for step in (1, 2):
        rep = ckpt.verify(root, step, storage_options=opts)
        assert rep.ok
        assert_clean("VerifyReport", repr(rep))
        assert_clean(
            "manifest bytes", raw.cat_file(f"{bucket}/run/steps/{step:012d}/manifest.json")
        )
    assert_clean("LATEST", raw.cat_file(f"{bucket}/run/LATEST"))
    assert_clean(
        "Storage repr", repr(open_storage(root, opts)) + str(open_storage(root, opts).__dict__.get("url"))
    )
    a = ckpt.begin(root, step=7, storage_options=opts)  # an attempt (what travels to writers)
    assert_clean("Attempt", repr(a) + repr(dataclasses.asdict(a)))
    report = ckpt.write_shards(a, _state(7), storage_options=opts)
    assert_clean("shard report", json.dumps(report, default=repr))

    # copies both ways: reports, and the copied manifests
    local = str(tmp_path / "local")
    down = ckpt.copy(root, local, src_storage_options=opts)
    assert down.steps_copied == (1, 2)
    assert_clean("CopyReport S3->local", json.dumps(down.to_json()) + repr(down))
    for name in ("steps/000000000001/manifest.json", "steps/000000000002/manifest.json", "LATEST"):
        with open(os.path.join(local, name), "rb") as f:
            assert_clean(f"copied {name}", f.read())
    up = ckpt.copy(local, f"s3://{bucket}/copy", dst_storage_options=opts)
    assert up.steps_copied == (1, 2)
    assert_clean("CopyReport local->S3", json.dumps(up.to_json()) + repr(up))
    assert ckpt.verify(f"s3://{bucket}/copy", 2, storage_options=opts).ok

    # failing operations: their exceptions must not carry the secrets either
    nowhere = "s3://no-such-bucket-ckpt-zz/run"
    in_url = f"s3://{OPT_KEY}:{OPT_SECRET}@{bucket}/run"
    errors = [
        _expect_error("missing step", lambda: ckpt.restore(root, 99, storage_options=opts)),
        _expect_error(
            "existing step", lambda: ckpt.save(root, _state(3), step=1, storage_options=opts)
        ),
        _expect_error(
            "bad bucket", lambda: ckpt.save(nowhere, _state(3), step=1, storage_options=opts)
        ),
        _expect_error("bad bucket listing", lambda: ckpt.restore(nowhere, storage_options=opts)),
        _expect_error(
            "bad option",
            lambda: ckpt.list_steps(root, storage_options={**opts, "max_concurrency": "x"}),
        ),
        _expect_error(
            "credentials in the URL", lambda: ckpt.begin(in_url, step=5, storage_options=opts)
        ),
    ]
    assert len(errors) == 6
    # a corrupt data file: verify finds it, restore raises naming it
    data = sorted(m2.files)[0]
    blob = bytearray(raw.cat_file(f"{bucket}/run/{data}"))
    blob[-1] ^= 0xFF
    raw.rm(f"{bucket}/run/{data}")
    raw.pipe_file(f"{bucket}/run/{data}", bytes(blob))
    bad = ckpt.verify(root, 2, storage_options=opts)
    assert not bad.ok
    assert_clean("VerifyReport of a corrupt step", repr(bad) + "\n".join(bad.problems))
    _expect_error("corrupt restore", lambda: ckpt.restore(root, 2, storage_options=opts))
    _expect_error("corrupt verify raise", bad.raise_if_failed)
    check_logs(debug_logs, min_records=200)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ckpt ARGS`` in a fresh interpreter with DEBUG logging to stderr for every logger."""
    boot = (
        "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stderr);"
        "from ckpt.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        [sys.executable, "-c", boot, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=repo,
    )


@pytest.mark.s3
def test_cli_output_holds_no_secret(s3_endpoint: str, secret_env: None) -> None:
    bucket = _bucket(s3_endpoint)
    root = f"s3://{bucket}/run"
    opts = _opts(s3_endpoint)
    ckpt.save(root, _state(1), step=1, storage_options=opts)
    m = ckpt.save(root, _state(2), step=2, storage_options=opts)
    env = {**os.environ, **ENV, "S3FS_LOGGING_LEVEL": "DEBUG"}
    # credentials from the environment; endpoint and SSE-C key as options
    common = [
        "--storage-option", f"endpoint_url={s3_endpoint}",
        "--storage-option", "s3_additional_kwargs=" + json.dumps(SSE_KWARGS),
        "--storage-option", "skip_instance_cache=true",
    ]  # fmt: skip
    # ... and once with the key and secret given as options too
    explicit = [*common, "--storage-option", f"key={OPT_KEY}", "--storage-option", f"secret={OPT_SECRET}",
                "--storage-option", f"token={OPT_TOKEN}"]  # fmt: skip
    runs = [
        (["ls", root, "--json", *common], 0),
        (["show", root, "--json", *explicit], 0),
        (["verify", root, "--json", "--all", *common], 0),
        (["show", root, "--step", "99", "--json", *explicit], None),  # missing step
        (["ls", "s3://no-such-bucket-ckpt-zz/run", "--json", *explicit], None),  # bad bucket
        (["verify", root, "--json", "--step", "2", *explicit], None),  # a corrupt file (made below)
    ]
    debug_lines = 0
    for i, (args, rc) in enumerate(runs):
        if i == len(runs) - 1:  # corrupt a data file for the last run
            raw = fsspec.filesystem("s3", **opts)
            data = sorted(m.files)[0]
            blob = bytearray(raw.cat_file(f"{bucket}/run/{data}"))
            blob[-1] ^= 0xFF
            raw.rm(f"{bucket}/run/{data}")
            raw.pipe_file(f"{bucket}/run/{data}", bytes(blob))
        p = _cli(args, env)
        if rc is not None:
            errs = [ln for ln in p.stderr.splitlines() if not ln.startswith("DEBUG")][-20:]
            assert p.returncode == rc, f"{args[0]} {p.stdout[-3000:]} {errs}"
        else:
            assert p.returncode != 0
        if args[0] in ("ls", "show", "verify") and p.stdout.strip():
            json.loads(p.stdout)
        assert_clean(f"ckpt {args[0]} stdout", p.stdout)
        assert_clean(f"ckpt {args[0]} stderr", p.stderr)
        debug_lines += p.stderr.count("DEBUG:botocore")
    assert debug_lines > 50  # botocore did log its requests: the scan means something


def test_redaction_filter_rewrites_botocore_records() -> None:
    """The redaction itself (fast, no S3): a record as botocore.endpoint logs it."""
    rec = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1, "Sending http request: %s",
        ({"X-Amz-Security-Token": OPT_TOKEN.encode(), "Authorization":
          f"AWS4-HMAC-SHA256 Credential={OPT_KEY}/20260101/us-east-1/s3/aws4_request".encode(),
          "x-amz-server-side-encryption-customer-key": base64.b64encode(SSE_KEY).decode(),
          "x-amz-server-side-encryption-customer-key-MD5": "kept", "Key": "run/LATEST"},), None,
    )  # fmt: skip
    assert leaks(rec.getMessage())
    redaction.RedactingFilter().filter(rec)
    text = rec.getMessage()
    assert not leaks(text), text
    assert "kept" in text
    assert "run/LATEST" in text
    assert redaction.REDACTED in text
    canonical = f"PUT\n/b/k\n\nx-amz-security-token:{ENV_TOKEN}\nx-amz-server-side-encryption-customer-key:" \
        f"{base64.b64encode(SSE_KEY).decode()}\n"  # fmt: skip
    assert not leaks(redaction.redact(canonical))
    sts = f"<AccessKeyId>{ENV_KEY}</AccessKeyId><SecretAccessKey>{ENV_SECRET}</SecretAccessKey>"
    assert not leaks(redaction.redact(sts))


def test_loggers_created_after_import_are_redacted_without_filters_on_them() -> None:
    """Redaction happens where records are made (the log record factory), so a child logger
    botocore creates later, logging through whatever handler the user set, is covered; and
    importing ckpt hangs no filter on anybody's loggers."""
    name = f"botocore.created_later_{uuid.uuid4().hex[:8]}"
    assert name not in logging.Logger.manager.loggerDict
    records: list[logging.LogRecord] = []
    keep = logging.Handler(level=logging.DEBUG)
    keep.emit = records.append  # type: ignore[method-assign]  # keeps the records themselves
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(keep)
    try:
        logger.debug("Sending http request: %s", {"X-Amz-Security-Token": OPT_TOKEN, "Key": "run/LATEST"})
        logger.debug("plain %s", "text")  # other records are untouched
    finally:
        logger.removeHandler(keep)
    texts = [f"{r.getMessage()} {r.msg!r} {r.args!r}" for r in records]
    assert len(texts) == 2
    assert not leaks(texts[0]), texts[0]
    assert "run/LATEST" in texts[0]
    assert "plain text" in texts[1]
    for n in ("botocore", "botocore.endpoint", "s3fs", "urllib3"):
        assert not logging.getLogger(n).filters, f"{n} has filters: {logging.getLogger(n).filters}"
    mine = logging.getLogger(f"myapp.{uuid.uuid4().hex[:8]}")
    rec = mine.makeRecord(mine.name, logging.DEBUG, __file__, 1, "token=%s", (OPT_TOKEN,), None)
    assert OPT_TOKEN in rec.getMessage()  # the user's own loggers are theirs: not rewritten


@pytest.mark.gcs
def test_gcs_bearer_token_stays_out_of_logs_and_errors(gcs_store: Any, debug_logs: _Keep) -> None:
    """A gs:// root with an OAuth access token (the emulator ignores it; gcsfs puts it in every
    request's Authorization header): DEBUG logs of every logger (gcsfs, aiohttp, google.auth,
    ckpt), errors, manifests and reports hold none of it."""
    import google.oauth2.credentials

    logging.getLogger("gcsfs").setLevel(logging.DEBUG)
    logging.getLogger("google").setLevel(logging.DEBUG)
    opts = {**gcs_store.opts, "token": google.oauth2.credentials.Credentials(token=OPT_TOKEN)}
    m = ckpt.save(gcs_store.root, _state(1), step=1, storage_options=opts)
    assert_clean("Manifest repr", repr(m))
    assert torch.equal(ckpt.restore(gcs_store.root, storage_options=opts)["w"], _state(1)["w"])
    assert_clean("VerifyReport", repr(ckpt.verify(gcs_store.root, storage_options=opts)))
    _expect_error("missing step", lambda: ckpt.restore(gcs_store.root, 9, storage_options=opts))
    _expect_error("missing bucket", lambda: ckpt.save("gs://ckpt-no-such-bucket/run", _state(1), step=1,
                                                      storage_options=opts))  # fmt: skip
    fsspec.filesystem("gs", **opts).ls(gcs_store.root.removeprefix("gs://").split("/")[0])  # gcsfs logs its calls
    assert debug_logs.texts, "nothing was logged: the scan would prove nothing"
    for name, text in debug_logs.texts:
        assert_clean(f"log record of {name}", text)


def test_storage_options_are_not_echoed_by_errors(tmp_path: Any) -> None:
    """Refused or broken options: messages name keys, never values."""
    opts = {"key": OPT_KEY, "secret": OPT_SECRET, "token": OPT_TOKEN}
    _expect_error("unknown protocol", lambda: ckpt.save("nosuchproto://x/run", {"w": torch.ones(2)}, step=1,
                                                        storage_options=opts))  # fmt: skip
    _expect_error("s3 option of the wrong type", lambda: ckpt.save("s3://bucket-x/run", {"w": torch.ones(2)}, step=1,
                                                                   storage_options={**opts, "client_kwargs": 7}))  # fmt: skip


# --- Azure: the account key and a SAS signature -----------------------------------------------


@pytest.mark.azure
def test_no_azure_key_or_sas_in_logs_errors_manifests(
    azure_endpoint: str, capsys: pytest.CaptureFixture[str], debug_logs: _Keep
) -> None:
    """Azurite with its account key (in a connection string) and with an account SAS: save,
    restore, verify, ``ckpt ls`` and failing operations leave neither the key nor the SAS
    signature in any log record (the azure SDK's own at DEBUG included: its logging policies
    redact the Authorization header and the ``sig`` parameter), exception or manifest."""
    from ckpt.cli import main
    from tests.support.emulators import AZURITE_KEY, azure_options, azure_sas_options

    keyed, sas = azure_options(azure_endpoint), azure_sas_options(azure_endpoint)
    sig = urllib.parse.parse_qs(sas["connection_string"].split("SharedAccessSignature=")[1])["sig"][0]
    secrets = [s for x in (AZURITE_KEY, sig) for s in {x, urllib.parse.quote(x), urllib.parse.quote(x, safe="")}]

    def clean(what: str, text: str | bytes) -> None:
        text = text.decode("latin-1") if isinstance(text, bytes) else text
        assert not [s for s in secrets if s in text], f"{what} holds a secret: {text[:2000]!r}"

    container = f"ckpt-secret-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("az", **keyed).mkdir(container)
    for i, opts in enumerate((keyed, sas)):
        with pytest.raises(ckpt.PlanError, match=r"\['connection_string'\] look like credentials") as refused:
            ckpt.parallel.ray.check_no_credentials(opts)  # never sent to Ray workers
        clean("Ray refusal", str(refused.value))
        root = f"az://{container}/run{i}"
        m = ckpt.save(root, _state(i), step=1, storage_options=opts)
        assert torch.equal(ckpt.restore(root, storage_options=opts)["w"], _state(i)["w"])
        rep = ckpt.verify(root, storage_options=opts)
        assert rep.ok
        clean("Manifest and VerifyReport", repr(m) + repr(rep) + m.to_json().decode())
        raw = fsspec.filesystem("az", **keyed)
        clean("manifest bytes", raw.cat_file(f"{container}/run{i}/steps/000000000001/manifest.json"))
        clean("LATEST", raw.cat_file(f"{container}/run{i}/LATEST"))
        st = open_storage(root, opts)
        clean("Storage", f"{st.url} {st.endpoint()} {st.where('x')}")
        assert main(["ls", root, "--json", "--storage-option", f"connection_string={opts['connection_string']}"]) == 0
        out, err = capsys.readouterr()
        clean("ckpt ls", out + err)
        wrong = opts["connection_string"]
        for real in secrets:  # a wrong key, or a SAS with a wrong signature
            wrong = wrong.replace(real, "d3Jvbmcta2V5" * 7 + "AAAA==")
        assert wrong != opts["connection_string"]
        for what, fn in [
            ("missing step", lambda: ckpt.restore(root, 99, storage_options=opts)),  # noqa: B023
            ("existing step", lambda: ckpt.save(root, _state(3), step=1, storage_options=opts)),  # noqa: B023
            ("no such container", lambda: ckpt.save(f"az://no-such-{container}/run", _state(3), step=1, storage_options=opts)),  # noqa: B023
            ("a wrong key", lambda: ckpt.list_steps(root, storage_options={"connection_string": wrong})),  # noqa: B023
        ]:
            with pytest.raises(ckpt.CkptError) as info:
                fn()
            for text in exception_texts(info.value):
                clean(f"{what} (exception)", text)
    names = {n for n, _ in debug_logs.texts}
    assert any(n.startswith("azure.") for n in names), names  # the SDK did log its requests
    assert len(debug_logs.texts) >= 100
    for name, text in debug_logs.texts:
        clean(f"log record of {name}", text)


# --- Ray: what ckpt.parallel.ray sends to workers --------------------------------------------------


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_with_env_credentials() -> Iterator[None]:
    """A local Ray instance whose workers inherit AWS_* credentials from the environment (the
    way ckpt.parallel.ray expects workers to get them)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = {k: os.environ.get(k) for k in [*ENV, "PYTHONPATH"]}
    os.environ.update(ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [repo, os.environ.get("PYTHONPATH", "")]
    )
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False
    )
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@ray.remote(num_cpus=0.5)
class Holder:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.w = torch.full((4, 3), float(rank))

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "w": ckpt.Shard(self.w, (4 * self.world, 3), (4 * self.rank, 0)),
            "b": torch.ones(3),
        }

    def env_credentials(self) -> str:
        """A digest of the worker's AWS_* environment (never the values themselves)."""
        env = "|".join(os.environ.get(k, "") for k in ENV)
        return hashlib.sha256(env.encode()).hexdigest()


class _Spy:
    """Stands for an actor handle; serializes what ckpt passes to ``__ray_call__.remote``
    (as Ray would) and forwards the call."""

    def __init__(self, actor: Any, sent: list[bytes]) -> None:
        self._actor, self._sent = actor, sent
        self.__ray_call__ = self

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self._sent.append(ray.cloudpickle.dumps((args, kwargs)))
        return self._actor.__ray_call__.remote(*args, **kwargs)


@pytest.mark.ray
@pytest.mark.s3
def test_ray_workers_get_no_secret_arguments(
    ray_with_env_credentials: None, s3_endpoint: str, debug_logs: _Keep
) -> None:
    bucket = _bucket(s3_endpoint)
    root = f"s3://{bucket}/ray"
    actors = [Holder.remote(r, 2) for r in range(2)]
    want = hashlib.sha256("|".join(ENV.values()).encode()).hexdigest()
    assert ray.get([a.env_credentials.remote() for a in actors]) == [
        want,
        want,
    ]  # via the environment
    sent: list[bytes] = []
    spies = [_Spy(a, sent) for a in actors]
    plain = {"endpoint_url": s3_endpoint, "skip_instance_cache": True}
    m = ckpt.parallel.ray.save(root, spies, step=1, storage_options=plain)
    assert m.world_size == 2
    assert len(sent) == 4  # describe + write, per actor
    for blob in sent:
        assert_clean("Ray task arguments", blob)
    assert torch.equal(ckpt.restore(root, storage_options=plain)["w"][4:], torch.ones(4, 3))
    # secret storage options are refused before anything is sent, naming keys, not values
    for secret_opts in (
        {**plain, "key": OPT_KEY, "secret": OPT_SECRET},
        {**plain, "token": OPT_TOKEN},
        {**plain, "s3_additional_kwargs": dict(SSE_KWARGS)},
        {**plain, "client_kwargs": {"aws_secret_access_key": OPT_SECRET}},
    ):
        sent.clear()
        with pytest.raises(ckpt.PlanError, match="look like credentials") as info:
            ckpt.parallel.ray.save(root, spies, step=2, storage_options=secret_opts)
        assert sent == []
        assert_clean_exception("ckpt.parallel.ray refusal", info.value)
        with pytest.raises(ckpt.PlanError) as info:
            ckpt.parallel.ray.restore(root, spies, storage_options=secret_opts)
        assert sent == []
        assert_clean_exception("ckpt.parallel.ray refusal", info.value)
        # the named coordinator actor is created with the options: refused before it is
        with pytest.raises(ckpt.PlanError):
            ckpt.parallel.ray.coordinator(root + "-spmd", storage_options=secret_opts)
    check_logs(debug_logs, min_records=20)


def test_zz_report_counts() -> None:
    """Not a check: prints how much text this module scanned (run with -s to see it)."""
    print(f"\nsecret scan: {STATS['texts']} texts, {STATS['records']} log records, "
          f"{STATS['chars']} characters, {len(SECRETS)} secret strings")  # fmt: skip
