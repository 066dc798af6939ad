"""The deployment recipes in deploy/ parse, agree with each other, and name things that exist:
the example script and the flags it accepts, the package, the files the Dockerfile copies, the
S3 actions ckpt really calls; and none of them carries a credential."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = ROOT / "examples" / "ray_train.py"  # what every recipe runs
DEMO = ROOT / "examples" / "ray_demo.py"
BASE_IMAGE = "rayproject/ray:2.60.0-py311"

KUBE = [DEPLOY / "kuberay" / n for n in ("serviceaccount.yaml", "rayjob.yaml", "raycluster.yaml")]
LAUNCHER = DEPLOY / "ray-cluster-aws.yaml"
COMPOSE = DEPLOY / "docker-compose.yaml"
POLICY = DEPLOY / "iam-policy.json"
LIFECYCLE = DEPLOY / "s3-lifecycle.json"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"

# Every S3 API storage.py calls (directly, or through the s3fs methods it uses) -> the IAM action
# that authorizes it. A new call in storage.py fails test_storage_calls_are_all_mapped until it
# is added here and to the policy.
S3_CALL_TO_ACTION = {
    "put_object": "s3:PutObject",
    "create_multipart_upload": "s3:PutObject",
    "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject",
    "abort_multipart_upload": "s3:AbortMultipartUpload",
    "list_multipart_uploads": "s3:ListBucketMultipartUploads",
    "head_object": "s3:GetObject",
    "get_object": "s3:GetObject",
    "list_objects_v2": "s3:ListBucket",  # s3fs find/exists/size on a miss
    "delete_objects": "s3:DeleteObject",  # s3fs rm
}
S3FS_METHOD_TO_CALLS = {
    "find": ["list_objects_v2"],
    "exists": ["head_object", "list_objects_v2"],
    "size": ["head_object", "list_objects_v2"],
    "cat_file": ["get_object"],
    "pipe_file": ["put_object"],  # mode="create": If-None-Match: *
    "rm": ["list_objects_v2", "delete_objects"],
}

SECRET_KEY = re.compile(r"secret|password|passwd|token|private_key|access_key", re.IGNORECASE)
ENV_REF = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")  # ${VAR}, ${VAR:?msg}, ${VAR:-x}


def _yaml_docs(path: pathlib.Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kube(kind: str) -> dict[str, Any]:
    found = [d for p in KUBE for d in _yaml_docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/kuberay, found {len(found)}"
    return found[0]


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("RayJob", _kube("RayJob")["spec"]["rayClusterSpec"]),
        ("RayCluster", _kube("RayCluster")["spec"]),
    ]


def _pod_specs(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def _policy_scope() -> tuple[str, str]:
    """(bucket, prefix) of the IAM policy's object statement."""
    objects = [
        s for s in json.loads(POLICY.read_text())["Statement"] if "s3:PutObject" in _actions(s)
    ]
    assert len(objects) == 1
    m = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)/(.+)/\*", objects[0]["Resource"])
    assert m, objects[0]["Resource"]
    return m.group(1), m.group(2) + "/"


def _actions(statement: dict[str, Any]) -> list[str]:
    a = statement["Action"]
    return [a] if isinstance(a, str) else list(a)


def _example_flags() -> set[str]:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))


def _dockerfile() -> list[tuple[str, str]]:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    return [tuple(ln.split(None, 1)) for ln in lines if ln and not ln.startswith("#")]  # type: ignore[misc]


def _workdir() -> str:
    workdirs = [arg for op, arg in _dockerfile() if op == "WORKDIR"]
    assert len(workdirs) == 1
    return workdirs[0].rstrip("/") + "/"


def _in_image(path: str) -> pathlib.Path:
    """The repository file an absolute path inside the image is copied from."""
    assert path.startswith(_workdir()), f"{path} is not under the image's WORKDIR {_workdir()}"
    return ROOT / path[len(_workdir()) :]


def _check_example_command(argv: list[str], flags: set[str]) -> tuple[str, dict[str, str]]:
    """A command running the training example on a cluster: every flag it gives is one the
    example accepts, given once with a value; the root is shared storage, no worker kills
    itself, and --workers is a count. Returns (script path, {flag: value})."""
    assert argv[0] == "python", argv
    script = argv[1]
    given: dict[str, str] = {}
    rest = argv[2:]
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), f"unexpected argument {flag!r} in {argv}"
        assert rest, f"{flag} has no value in {argv}"
        assert flag in flags, (
            f"{flag} is not a flag of examples/ray_train.py (it has {sorted(flags)})"
        )
        assert flag not in given, f"{flag} given twice in {argv}"
        given[flag] = rest.pop(0)
    assert "--root" in given
    assert given["--root"].startswith("s3://"), "a local root exists on one node only"
    assert given.get("--kill-at") == "-1", "a recipe runs without the simulated worker loss"
    assert int(given["--workers"]) >= 1
    return script, given


def _pod_cpus(pod: dict[str, Any]) -> int:
    (c,) = pod["containers"]
    return int(c["resources"]["limits"]["cpu"])


def _worker_cpus(cluster: dict[str, Any]) -> int:
    """CPUs Ray sees on a KubeRay cluster's workers at their initial size (KubeRay sets
    num-cpus from the container's CPU limit unless rayStartParams does)."""
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", "the head runs the driver, no training workers"
    total = 0
    for g in cluster["workerGroupSpecs"]:
        cpus = g["rayStartParams"].get("num-cpus") or _pod_cpus(g["template"]["spec"])
        total += int(g["replicas"]) * int(cpus)
    return total


# --- every file ------------------------------------------------------------------------------


def test_every_deploy_file_parses_and_is_checked() -> None:
    checked = {*KUBE, LAUNCHER, COMPOSE, POLICY, LIFECYCLE, DOCKERFILE, ENV_EXAMPLE,
               DEPLOY / "Dockerfile.dockerignore", DEPLOY / ".gitignore", DEPLOY / "README.md"}  # fmt: skip
    present = {p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present - checked == set(), "a new file under deploy/ needs a check in this test"
    assert checked - present == set()
    for p in present:
        if p.suffix in (".yaml", ".yml"):
            assert _yaml_docs(p), p
        elif p.suffix == ".json":
            assert isinstance(json.loads(p.read_text()), dict), p


def _walk(node: Any, where: str) -> list[tuple[str, str, Any]]:
    """(where, key, value) for every mapping entry, and for every Kubernetes-style
    {name: ..., value: ...} environment entry."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node:
            out.append((where, node["name"], node["value"]))
        for k, v in node.items():
            out.append((where, str(k), v))
            out += _walk(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{where}[{i}]")
    return out


def _structured_files() -> list[tuple[pathlib.Path, Any]]:
    out: list[tuple[pathlib.Path, Any]] = []
    for p in sorted(DEPLOY.rglob("*")):
        if p.suffix in (".yaml", ".yml"):
            out += [(p, d) for d in _yaml_docs(p)]
        elif p.suffix == ".json":
            out.append((p, json.loads(p.read_text())))
    return out


def test_no_manifest_holds_a_secret_literal() -> None:
    problems = []
    for path, doc in _structured_files():
        for where, key, value in _walk(doc, path.name):
            literal = isinstance(value, str | int) and str(value) != ""
            reference = isinstance(value, str) and ENV_REF.match(value)
            if SECRET_KEY.search(key) and literal and not reference:
                problems.append(f"{where}: {key} = {value!r}")
    assert problems == []


def test_credentials_stay_out_of_cluster_recipes() -> None:
    """Kubernetes and the cluster launcher get credentials from IRSA / instance profiles: no
    AWS key variable is named there at all; nothing anywhere looks like an access key id."""
    for p in [*KUBE, LAUNCHER, DOCKERFILE]:
        text = p.read_text()
        for name in (
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SESSION_TOKEN",
            "aws_secret_access_key",
        ):
            assert name not in text, f"{p.name} names {name}"
        assert "kind: Secret" not in text
    for p in DEPLOY.rglob("*"):
        if p.is_file():
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", p.read_text()), p


def test_env_example_holds_dev_only_placeholders_for_every_compose_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    assert "DEVELOPMENT ONLY" in text.upper()
    values = dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    for k, v in values.items():
        if SECRET_KEY.search(k):
            assert "placeholder" in v or "change-me" in v, (
                f"{k} in .env.example is not an obvious placeholder"
            )
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used, "docker-compose.yaml reads its credentials from variables"
    assert used <= set(values), (
        f"variables without a placeholder in .env.example: {used - set(values)}"
    )
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# --- joining a running cluster --------------------------------------------------------------

# ray.init arguments Ray 2.60 refuses when connecting to a running cluster (ray/_private/worker.py)
LOCAL_ONLY = {"num_cpus", "num_gpus", "resources", "labels", "object_store_memory",
              "_system_config", "_enable_object_reconstruction", "_node_name"}  # fmt: skip


def test_training_example_joins_a_running_cluster() -> None:
    """ray_train.py's ray.init passes nothing that only sizes a new local instance, so in a Ray
    job (RAY_ADDRESS set) or on a `ray start` node it joins the cluster."""
    calls = re.findall(r"ray\.init\(([^)]*)\)", EXAMPLE.read_text())
    assert calls
    for kw in calls:
        names = set(re.findall(r"(\w+)=", kw))
        assert "address" in names
        assert not names & LOCAL_ONLY, f"ray.init({kw}) is refused on a running cluster"


def _load_demo() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_demo_under_test", DEMO)
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_starts_its_own_ray_unless_told_to_join(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = _load_demo()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # `make demo`: a private local instance, sized as before
    assert demo.ray_init_kwargs(None) == {"num_cpus": 4, "include_dashboard": False,
                                          "log_to_driver": False, "object_store_memory": 100 << 20}  # fmt: skip
    for address, env in (("auto", None), ("10.0.0.1:6379", None), (None, "10.0.0.1:6379")):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        kw = demo.ray_init_kwargs(address)
        assert kw["address"] == address  # None: ray.init reads RAY_ADDRESS itself
        assert not set(kw) & LOCAL_ONLY, kw
    joining = subprocess.run(
        [sys.executable, str(DEMO), "--address", "auto"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert joining.returncode != 0
    assert "--root" in joining.stderr  # a temp dir on the driver is no root for a cluster


# --- KubeRay ---------------------------------------------------------------------------------


def test_service_account_is_irsa() -> None:
    sa = _kube("ServiceAccount")
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", arn)
    ns = sa["metadata"]["namespace"]
    assert any(
        d.get("kind") == "Namespace" and d["metadata"]["name"] == ns for d in _yaml_docs(KUBE[0])
    )


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_kuberay_pods_use_the_service_account_and_one_image(kind: str) -> None:
    sa = _kube("ServiceAccount")["metadata"]
    doc = _kube(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["namespace"] == sa["namespace"]
    cluster = dict(_ray_cluster_specs())[kind]
    assert cluster["rayVersion"] == BASE_IMAGE.split(":")[1].split("-")[0]
    assert cluster["workerGroupSpecs"], "no worker group"
    images = set()
    for pod in _pod_specs(cluster):
        assert pod["serviceAccountName"] == sa["name"]
        assert pod.get("automountServiceAccountToken", True) is not False  # IRSA needs the token
        for c in pod["containers"]:
            images.add(c["image"])
            assert "envFrom" not in c
            for e in c.get("env", []):
                assert "secretKeyRef" not in str(e.get("valueFrom", "")), e
    assert len(images) == 1
    (image,) = images
    assert re.search(r"/ckpt-ray:[\w.-]+$", image), image  # built from deploy/Dockerfile


def test_rayjob_runs_the_example_on_the_policy_bucket() -> None:
    job = _kube("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    script, given = _check_example_command(argv, _example_flags())
    assert _in_image(script) == EXAMPLE
    assert "--address" not in given  # the driver joins through RAY_ADDRESS, set by KubeRay
    bucket, prefix = _policy_scope()
    assert given["--root"].startswith(f"s3://{bucket}/{prefix}"), (
        "the root must be inside the IAM policy's prefix"
    )
    # one Ray Train worker (1 CPU each) per worker CPU: all of them start at once
    assert int(given["--workers"]) == _worker_cpus(job["rayClusterSpec"])
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert not any(SECRET_KEY.search(k) for k in env.get("env_vars", {}))
    assert job["shutdownAfterJobFinishes"] is True


def test_raycluster_usage_runs_the_example() -> None:
    text = (DEPLOY / "kuberay" / "raycluster.yaml").read_text()
    cmd = re.search(r"python (/\S+\.py) (--root .+)$", text, re.MULTILINE)
    assert cmd
    script, given = _check_example_command(
        ["python", cmd.group(1), *shlex.split(cmd.group(2))], _example_flags()
    )
    assert _in_image(script) == EXAMPLE
    bucket, prefix = _policy_scope()
    assert given["--root"].startswith(f"s3://{bucket}/{prefix}")
    assert int(given["--workers"]) <= _worker_cpus(_kube("RayCluster")["spec"])


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_builds_ckpt_on_the_ray_image() -> None:
    ops = _dockerfile()
    assert ops[0] == ("FROM", BASE_IMAGE)
    copied = []
    for op, arg in ops:
        if op == "COPY":
            parts = [p for p in arg.split() if not p.startswith("--")]
            copied += parts[:-1]
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    assert {"ckpt", "pyproject.toml", "examples"} <= set(copied)
    assert not any(src.startswith("deploy/") for src in copied)  # the examples run as they are
    runs = " ".join(arg for op, arg in ops if op == "RUN")
    assert 'pip install --no-cache-dir ".[s3]"' in runs
    assert "s3fs" in (ROOT / "pyproject.toml").read_text()  # the [s3] extra exists
    assert (ROOT / "ckpt" / "__init__.py").is_file()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/**" in ignore, (
            f"{src} is excluded from the build context"
        )


# --- Ray cluster launcher --------------------------------------------------------------------


def test_cluster_launcher_config() -> None:
    (cfg,) = _yaml_docs(LAUNCHER)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == BASE_IMAGE
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert len(types) >= 2, "head and worker types"
    for name, t in types.items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    # the repository is mounted and installed with the s3 extra on every node
    ((remote, local),) = cfg["file_mounts"].items()
    assert (ROOT / local / "ckpt" / "__init__.py").is_file()
    assert any(f"pip install --no-cache-dir {remote}'[s3]'" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    # the usage line runs the example from the mounted repository with flags it has
    m = re.search(r"'python (\S+) ([^']+)'", LAUNCHER.read_text())
    assert m
    assert m.group(1) == f"{remote}/examples/ray_train.py"
    assert (ROOT / local / "examples" / "ray_train.py").resolve() == EXAMPLE
    _, given = _check_example_command(
        ["python", m.group(1), *shlex.split(m.group(2))], _example_flags()
    )
    bucket, prefix = _policy_scope()
    assert given["--root"].startswith(f"s3://{bucket}/{prefix}")
    # one Ray Train worker per CPU of the workers the cluster starts with (the head has none)
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    vcpus = {"m6i.xlarge": 4, "m6i.2xlarge": 8, "m6i.4xlarge": 16}
    start = sum(t["min_workers"] * vcpus[t["node_config"]["InstanceType"]] for t in workers)
    assert int(given["--workers"]) == start


# --- IAM -------------------------------------------------------------------------------------


def test_storage_calls_are_all_mapped() -> None:
    """Every S3 API the S3 backend calls by name, and every s3fs method it uses, is in the table."""
    src = _s3_backend_source()
    direct = set(re.findall(r"_?call_s3\(\s*\"(\w+)\"", src))
    assert {
        "put_object",
        "complete_multipart_upload",
        "head_object",
        "list_multipart_uploads",
    } <= direct
    assert direct <= set(S3_CALL_TO_ACTION), (
        f"unmapped S3 calls in storage.py: {direct - set(S3_CALL_TO_ACTION)}"
    )
    used = set(re.findall(r"self\.fs\.(\w+)\(", src)) - {
        "call_s3",
        "_call_s3",
        "invalidate_cache",
        "split_path",
    }
    assert used <= set(S3FS_METHOD_TO_CALLS), (
        f"unmapped s3fs methods in storage.py: {used - set(S3FS_METHOD_TO_CALLS)}"
    )


def _s3_backend_source() -> str:
    """The code an S3 root runs: ckpt/storage/_s3.py, and the generic methods it inherits."""
    import inspect

    from ckpt.storage import FsspecStorage, S3Storage

    inherited = [
        inspect.getsource(fn)
        for name, fn in vars(FsspecStorage).items()
        if callable(fn) and name not in vars(S3Storage) and not name.startswith("__")
    ]
    return "\n".join([(ROOT / "ckpt" / "storage" / "_s3.py").read_text(), *inherited])


def test_iam_policy_is_exactly_what_ckpt_calls_on_one_prefix() -> None:
    src = _s3_backend_source()
    calls = set(re.findall(r"_?call_s3\(\s*\"(\w+)\"", src))
    for method in set(re.findall(r"self\.fs\.(\w+)\(", src)) & set(S3FS_METHOD_TO_CALLS):
        calls |= set(S3FS_METHOD_TO_CALLS[method])
    needed = {S3_CALL_TO_ACTION[c] for c in calls}

    policy = json.loads(POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    granted: set[str] = set()
    bucket, prefix = _policy_scope()
    for s in policy["Statement"]:
        assert s["Effect"] == "Allow"
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        for r in resources:
            assert "*" not in r.removesuffix(f"/{prefix}*"), f"{s['Sid']}: {r} is not scoped"
            assert r in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}*"), r
        for a in _actions(s):
            assert "*" not in a, a
            granted.add(a)
            if a == "s3:ListBucket":  # listing is limited to the prefix
                prefixes = s["Condition"]["StringLike"]["s3:prefix"]
                prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
                assert prefixes
                assert all(p.startswith(prefix) for p in prefixes), prefixes
            elif a.startswith("s3:") and a not in ("s3:ListBucketMultipartUploads",):
                assert resources == [f"arn:aws:s3:::{bucket}/{prefix}*"], (
                    f"{a} must apply to the prefix only"
                )
    assert granted == needed, (
        f"missing: {needed - granted}, more than ckpt uses: {granted - needed}"
    )


# --- lifecycle -------------------------------------------------------------------------------


def test_lifecycle_aborts_uploads_and_archives_the_archive_prefix() -> None:
    rules = json.loads(LIFECYCLE.read_text())["Rules"]
    assert len({r["ID"] for r in rules}) == len(rules)
    for r in rules:
        assert r["Status"] in ("Enabled", "Disabled")
        assert "Filter" in r
        assert "Prefix" not in r
    abort = [r for r in rules if "AbortIncompleteMultipartUpload" in r and r["Status"] == "Enabled"]
    assert len(abort) == 1
    assert abort[0]["Filter"].get("Prefix", "") in (
        "",
        _policy_scope()[1],
    )  # covers the ckpt prefix
    days = abort[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
    assert isinstance(days, int)
    assert days >= 2, "shorter than ckpt gc's 1-day grace (it is the backstop)"
    archive = [
        r for r in rules if r["Filter"].get("Prefix") == "archive/" and r["Status"] == "Enabled"
    ]
    assert len(archive) == 1
    transitions = archive[0]["Transitions"]
    assert transitions
    assert all(t["StorageClass"] in ("GLACIER_IR", "DEEP_ARCHIVE") for t in transitions)


# --- docker compose --------------------------------------------------------------------------


def test_compose_runs_the_example_against_minio() -> None:
    (compose,) = _yaml_docs(COMPOSE)
    services = compose["services"]
    for name, svc in services.items():
        assert isinstance(svc.get("image"), str), f"{name} has no image"
        assert svc["image"], f"{name} has no image"
        if "build" in svc:
            assert (
                COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]
            ).resolve() == DOCKERFILE
    built = {s["image"] for s in services.values() if "build" in s}
    assert len(built) == 1
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")  # pinned, not latest

    # the bucket creator waits for MinIO and creates the bucket the demo uses, the policy's
    mc = services["create-bucket"]
    assert mc["image"].startswith("minio/mc:")
    assert mc["depends_on"]["minio"]["condition"] == "service_healthy"
    made = re.search(r"mc mb (?:--ignore-existing )?local/([a-z0-9.-]+)", " ".join(mc["command"]))
    assert made
    assert made.group(1) == _policy_scope()[0]  # the same placeholder bucket everywhere
    assert "http://minio:9000" in " ".join(mc["command"])

    # the head listens where the worker points
    head, worker = services["ray-head"], services["ray-worker"]
    head_cmd, worker_cmd = " ".join(head["command"]), " ".join(worker["command"])
    assert "--head" in head_cmd
    port = re.search(r"--port=(\d+)", head_cmd)
    assert port
    assert f"--address=ray-head:{port.group(1)}" in worker_cmd
    assert "ray-head" in worker["depends_on"]
    assert head["image"] == worker["image"] in built

    # the demo job submits the example to the head, checkpoints to MinIO
    demo = services["demo"]
    assert demo["image"] in built
    cmd = demo["command"]
    assert cmd[:3] == ["ray", "job", "submit"]
    addr = next(a for a in cmd if a.startswith("--address="))
    assert re.fullmatch(r"--address=http://ray-head:\d+", addr)
    argv = cmd[cmd.index("--") + 1 :]
    script, given = _check_example_command(argv, _example_flags())
    assert _in_image(script) == EXAMPLE
    assert given["--root"].startswith(f"s3://{made.group(1)}/{_policy_scope()[1]}")
    assert given["--storage-option"] == "endpoint_url=http://minio:9000"
    cpus = re.search(r"--num-cpus=(\d+)", worker_cmd)
    assert cpus
    assert int(given["--workers"]) <= int(cpus.group(1)), "more Ray Train workers than CPUs"
    assert "--num-cpus=0" in head_cmd  # the driver alone on the head
    # the workers (on ray-worker) write the loss logs the driver (on ray-head) reads, and Ray
    # Train's run state goes under the log dir: one volume, same path, on both nodes
    log_dir = given["--log-dir"]
    for svc in (head, worker):
        mounts = [v.split(":")[:2] for v in svc["volumes"]]
        assert any(
            name in compose["volumes"] and f"{log_dir}/".startswith(f"{path}/")
            for name, path in mounts
        ), f"--log-dir {log_dir} is not on a shared volume"
    assert any(op == "RUN" and log_dir in arg for op, arg in _dockerfile()), (
        "the image must create the log dir (a new volume takes its owner)"
    )
    assert demo["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"

    # every Ray node gets the MinIO credentials from variables (read from .env), never literals
    for svc in (head, worker):
        env = svc["environment"]
        assert ENV_REF.match(env["AWS_ACCESS_KEY_ID"])
        assert ENV_REF.match(env["AWS_SECRET_ACCESS_KEY"])
