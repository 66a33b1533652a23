"""S3 storage: the DVC remote that versions every round, and boto3 for what DVC does not own.

DVC owns the rounds' data and models: `rlhf remote` makes an S3 bucket its default remote, `storage.push`
pushes each round as soon as it completes, and `dvc push` / `dvc pull` are the user's own commands.
boto3 does the rest: `rlhf publish` puts one round's models and results under a plain S3 prefix for
people who do not use DVC, and prompt sets may be `s3://bucket/key` objects.

Credentials come from the environment or boto3's chain (profiles, SSO, instance roles) and are never
written by this module; the endpoint of an S3-compatible store from `--endpoint-url` or AWS_ENDPOINT_URL,
which boto3 and DVC both read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from rlhf.core.errors import UserError
from rlhf.core.paths import ROUND_STEPS, SFT, round_paths
from rlhf.core.processes import dying_with_parent, error_line
from rlhf.core.s3 import check_bucket, client, s3_errors, split_s3

MiB = 2**20
# Two attempts a request, not botocore's five, for DVC's transfers: a remote that is down or dies fails a push or
# a pull in seconds, not minutes (DVC retries file by file).
FEW_RETRIES = {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}


# ---- DVC's remote -------------------------------------------------------------------------------------


def dvc(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a dvc command in the project (or in `cwd`); its output, or a UserError with DVC's first error line."""
    out = subprocess.run(dying_with_parent("dvc", *args), capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode:
        raise UserError(f"dvc {args[0]} failed: {error_line(out.stderr.splitlines())}")
    return out.stdout


def remotes() -> dict[str, tuple[str, bool]]:
    """The project's DVC remotes: name -> (URL, whether it is the default)."""
    rows = [line.split() for line in dvc("remote", "list").splitlines() if line.strip()]
    return {r[0]: (r[1], "(default)" in r) for r in rows}


def default_remote() -> tuple[str, str | None] | None:
    """The project's default DVC remote: (URL, its endpointurl or None), or None when it has none."""
    name = next((n for n, (_, is_default) in remotes().items() if is_default), None)
    return None if name is None else (remotes()[name][0], endpoint_of(name))


def endpoint_of(name: str) -> str | None:
    """The endpointurl DVC's remote `name` has (an S3-compatible store), or None (AWS)."""
    out = subprocess.run(
        dying_with_parent("dvc", "config", f"remote.{name}.endpointurl"), capture_output=True, text=True
    )
    return out.stdout.strip() or None


def configure_remote(
    url: str, endpoint_url: str | None = None, name: str = "s3", check: bool = True, cwd: str | Path | None = None
) -> str:
    """Make `url` the project's (or `cwd`'s) default DVC remote, `name` (replacing one of that name). Only the URL
    and the endpoint are written, to .dvc/config: credentials stay in the environment or boto3's chain."""
    split_s3(url)
    if check:
        check_bucket(url, endpoint_url)
    dvc("remote", "add", "--default", "--force", name, url, cwd=cwd)
    if endpoint_url:
        dvc("remote", "modify", name, "endpointurl", endpoint_url, cwd=cwd)
    return f"DVC remote {name!r}: {url}" + (f" at {endpoint_url}" if endpoint_url else "") + " (the default)"


def remote_for_push(name: str | None, key: str = "storage.push") -> str:
    """The remote `storage.push` pushes to: `name`, or the default one; one line naming `key` when there is none."""
    have = remotes()
    if name is None:
        default = [n for n, (_, is_default) in have.items() if is_default]
        if not default:
            raise UserError(
                f"{key}: the project has no default DVC remote; add one with "
                "`rlhf remote s3://bucket/prefix`, or name one in storage.remote"
            )
        return default[0]
    if name not in have:
        raise UserError(f"storage.remote: no DVC remote {name!r} (have: {', '.join(have) or 'none'})")
    return name


def push_round(rnd: str, remote: str | None = None, timeout: float = 30, say=lambda line: None) -> str:
    """`dvc push` the outputs of round `rnd`'s stages, and the run-cache (what `storage.pull` restores a stage
    from on another machine); DVC's summary, or one line naming the remote. `say` gets a line saying what goes
    where as it starts; a remote that does not answer fails it within about `timeout` seconds (storage.timeout)."""
    from rlhf.core.io import disk_bytes
    from rlhf.core.paths import step_files

    steps = ["prepare"] if rnd == "r00" else ROUND_STEPS
    targets = ["prepare"] if rnd == "r00" else [f"{step}@{rnd}" for step in steps]
    name = remote_for_push(remote)
    url = remotes()[name][0]
    size = disk_bytes(f for step in steps for f in step_files(step, rnd)) / MiB
    say(f"pushing {rnd} ({size:,.1f} MiB, what the remote lacks of it) to remote {name!r} ({url})")
    failed = f"dvc push of {rnd} to remote {name!r} ({url}) failed"
    try:
        check_bucket(url, endpoint_of(name), timeout)  # DVC's own retries, file by file, take minutes
    except UserError as e:
        raise UserError(f"{failed}: {str(e).removeprefix(f'{url}: ')} (storage.timeout: {timeout:g} s)") from None
    env = {**os.environ, **FEW_RETRIES}
    try:
        out = dvc("push", "--run-cache", "--remote", name, *targets, env=env)
    except UserError as e:
        raise UserError(f"{failed}: {_dvc_problem(e)}") from None
    return out.strip().splitlines()[-1] if out.strip() else "Everything is up to date."


def _dvc_problem(e: UserError) -> str:
    """DVC's error line for an S3 failure, without the repetition botocore adds."""
    problem = re.sub(r"^dvc \w+ failed: (unexpected error - |failed to transfer '\w+(\.dir)?' - )?", "", str(e))
    if dead := re.search(r'Could not connect to the endpoint URL: "(\w+://[^/"]+)', problem):
        return f"cannot connect to the S3 endpoint {dead[1]}"  # not the URL of the first object it tried
    problem = re.sub(r": An error occurred \((\w+)\) when calling the \w+ operation.*", r" (\1)", problem)
    denied = re.search(r"\b403\b|Forbidden|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch", problem)
    return problem + (": check the credentials" if denied else "")


# ---- publishing a round -------------------------------------------------------------------------------


def round_files(rnd: str, project: str | Path = ".") -> dict[str, Path]:
    """What `rlhf publish` uploads of a round, relative key -> local file: the policy, the reward model,
    the metrics, the held-out samples and landscape, and the report (reports/) if there is one."""
    paths = round_paths(rnd, project)
    if not paths.metrics.is_file():
        raise UserError(f"{paths.metrics}: no such file; round {rnd} has not completed")
    files = {}
    for item in (paths.policy, paths.reward_model, paths.metrics, paths.eval_samples, paths.landscape):
        for f in sorted(item.rglob("*")) if item.is_dir() else [item]:
            if f.is_file():
                files[f.relative_to(paths.root).as_posix()] = f
    for f in sorted((Path(project) / "reports").glob("*")):
        if f.is_file():
            files[f"report/{f.name}"] = f
    return files


def loadable(files: dict[str, Path], scratch: Path, project: str | Path = ".") -> dict[str, Path]:
    """`files` of a round (round_files) such that the published copy loads by itself. A LoRA round's policy is
    an adapter whose adapter_config.json names its base by a path on this machine (round 0's policy); the
    published adapter_config.json (written into `scratch`) names instead the hub id that policy was copied
    from, or else the base is carried under base/ and named `../base`, relative to the adapter's folder."""
    adapter = files.get("policy/adapter_config.json")
    if adapter is None:
        return files
    config = json.loads(adapter.read_text(encoding="utf-8"))
    base = Path(project, config["base_model_name_or_path"])
    hub = hub_policy(project)
    if hub and base.resolve() == Path(project, SFT.policy).resolve():
        config["base_model_name_or_path"] = hub
    elif base.is_dir():
        carried = {f"base/{f.relative_to(base).as_posix()}": f for f in sorted(base.rglob("*")) if f.is_file()}
        files = {**files, **carried}
        config["base_model_name_or_path"] = "../base"
    else:  # not a folder here: a hub id already
        return files
    (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {**files, "policy/adapter_config.json": scratch / "adapter_config.json"}


def hub_policy(project: str | Path = ".") -> str | None:
    """The hub id round 0's policy was copied from (prepare.policy with no prepare.base, no local folder), as
    dvc.lock records the prepare stage's params, else as params.yaml gives them; None for a policy made here."""
    import yaml

    try:
        prepare = yaml.safe_load(Path(project, "dvc.lock").read_text())["stages"]["prepare"]["params"]["params.yaml"]
        prepare = prepare["prepare"]
    except (OSError, KeyError, TypeError):
        try:
            prepare = (yaml.safe_load(Path(project, "params.yaml").read_text()) or {}).get("prepare") or {}
        except OSError:
            return None
    policy = prepare.get("policy", "tiny")
    if policy == "tiny" or prepare.get("base") or Path(project, policy).expanduser().exists():
        return None
    return policy


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def publish(
    rnd: str, dest: str, endpoint_url: str | None = None, project: str | Path = ".", multipart_mib: int = 64, log=print
) -> dict[str, list[str]]:
    """Upload round `rnd`'s files under `dest`/rNN/ with SHA-256 checksums (S3 verifies each request's;
    the whole file's is kept in the object's metadata as `sha256`), in parts above `multipart_mib` MiB,
    skipping objects already there with the same sha256; a LoRA policy with a base anyone can load (loadable).
    Returns the keys uploaded and skipped."""
    with tempfile.TemporaryDirectory() as scratch:
        files = loadable(round_files(rnd, project), Path(scratch), project)
        return _upload(files, rnd, dest, endpoint_url, multipart_mib, log)


def _upload(files: dict[str, Path], rnd: str, dest: str, endpoint_url, multipart_mib: int, log) -> dict[str, list[str]]:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    bucket, prefix = split_s3(dest)
    s3 = client(endpoint_url)
    transfer = TransferConfig(multipart_threshold=multipart_mib * MiB, multipart_chunksize=multipart_mib * MiB)
    done: dict[str, list[str]] = {"uploaded": [], "skipped": []}
    with s3_errors(dest, s3):
        s3.head_bucket(Bucket=bucket)
        for rel, path in files.items():
            key = "/".join(p for p in (prefix, rnd, rel) if p)
            digest = sha256(path)
            try:
                there = s3.head_object(Bucket=bucket, Key=key)["Metadata"].get("sha256")
            except ClientError as e:
                if e.response["Error"].get("Code") not in ("404", "NoSuchKey"):
                    raise
                there = None
            if there == digest:
                done["skipped"].append(key)
                log(f"skipped s3://{bucket}/{key} (already there, same sha256)")
                continue
            s3.upload_file(
                str(path),
                bucket,
                key,
                Config=transfer,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}},
            )
            done["uploaded"].append(key)
            log(f"uploaded s3://{bucket}/{key} ({_size(path.stat().st_size)}, sha256 {digest[:12]}...)")
    return done


def _size(n: int) -> str:
    unit = next(u for u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if n >= 2 ** u[0] or not u[0])
    return f"{n / 2 ** unit[0]:.1f} {unit[1]}"
