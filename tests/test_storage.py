"""S3 storage against a real S3 API server on loopback (moto_server, started here): the DVC remote
(`rlhf remote`, the flow's push after each round, `dvc pull` restoring identical files), `rlhf publish`
(checksums, multipart, skipping what is there), s3:// prompt sets, and the one-line errors for an
unreachable endpoint, a missing bucket and bad credentials, which leave every local artifact as it was."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from rlhf.core.processes import free_port, stop
from tests.conftest import BIN, TINY, make_project

KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def start_moto(tmp: Path, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp / f"moto-{port}.log").open("w")
    proc = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log = (tmp / f"moto-{port}.log").read_text()[-2000:]
                raise RuntimeError(f"moto_server did not start: {log}") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 endpoint of a moto_server on a free loopback port (data in memory, gone when it stops)."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    yield url
    stop(proc, timeout=30)


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **KEYS)


def env(tmp: Path, **extra) -> dict:
    """Dummy credentials in the environment (as a user's would be), and nothing from ~/.aws."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **base,
        "AWS_ACCESS_KEY_ID": KEYS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": KEYS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": KEYS["region_name"],
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        **extra,
    }


def run(cmd, project: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / cmd[0], *cmd[1:]],
        cwd=project,
        env=env(project.parent, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    return out.stderr.strip().splitlines()[-1]


def set_params(project: Path, change) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory, s3):
    """The tiny project after a round, recorded by DVC, with the bucket `rounds` as its DVC remote."""
    dest = tmp_path_factory.mktemp("storage") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    subprocess.run([BIN / "dvc", "commit", "-f", "-q"], cwd=dest, check=True)
    client(s3).create_bucket(Bucket="rounds")
    out = run(["rlhf", "remote", "s3://rounds/project", "--endpoint-url", s3], dest)
    assert out.returncode == 0 and "DVC remote 's3': s3://rounds/project" in out.stdout, out.stderr
    return dest


def test_remote_config_keeps_the_endpoint_and_no_credentials(project, s3):
    config = (project / ".dvc" / "config").read_text()
    assert "url = s3://rounds/project" in config and f"endpointurl = {s3}" in config
    secrets = [KEYS["aws_secret_access_key"], "access_key", "secret"]
    for path in (project / ".dvc").glob("config*"):
        assert not any(s in path.read_text() for s in secrets), path


def test_rounds_pushed_by_the_flow_are_pulled_back_identical(project, s3):
    set_params(project, lambda p: p.setdefault("storage", {}).update(push=True))
    out = run(["rlhf", "run"], project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "r00 pushed: " in out.stderr and "r01 pushed: " in out.stderr
    # each push says what goes where as it starts
    assert re.search(
        r"pushing r01 \([\d.]+ MiB, what the remote lacks of it\) to remote 's3' \(s3://rounds/project\)", out.stderr
    )
    assert "Everything is up to date." in run(["dvc", "push"], project).stdout  # the flow pushed it all
    stored = client(s3).list_objects_v2(Bucket="rounds", Prefix="project/files/md5/")
    assert stored["KeyCount"] > 10
    rounds, lock = digest(project / "data" / "rounds"), (project / "dvc.lock").read_text()
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data" / "rounds")
    out = run(["dvc", "pull"], project)
    assert out.returncode == 0, out.stderr
    assert digest(project / "data" / "rounds") == rounds and (project / "dvc.lock").read_text() == lock
    assert "Data and pipelines are up to date." in run(["dvc", "status"], project).stdout


def test_an_unreachable_remote_fails_the_run_in_one_line_and_loses_nothing(project):
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["remote", "add", "dead", "s3://rounds/project"], ["remote", "modify", "dead", "endpointurl", dead]):
        subprocess.run([BIN / "dvc", *args], cwd=project, check=True)
    set_params(project, lambda p: p.setdefault("storage", {}).update(push=True, remote="dead"))
    before = digest(project / "data" / "rounds"), (project / "dvc.lock").read_text()
    try:
        out = run(["rlhf", "run"], project)
    finally:
        set_params(project, lambda p: p["storage"].update(push=False, remote=None))
        subprocess.run([BIN / "dvc", "remote", "remove", "dead"], cwd=project, check=True)
    assert one_line_error(out) == (
        "error: dvc push of r00 to remote 'dead' (s3://rounds/project) failed: "
        f"cannot connect to the S3 endpoint {dead} (storage.timeout: 30 s)"
    )
    assert (digest(project / "data" / "rounds"), (project / "dvc.lock").read_text()) == before


def test_a_remote_that_does_not_answer_fails_a_push_within_storage_timeout(project, monkeypatch):
    """A remote whose machine takes connections but never answers (hung, or a firewall that drops): the push
    fails in about storage.timeout seconds, naming the remote, not after botocore's minute a request."""
    from rlhf.core.errors import UserError
    from rlhf.orchestration.storage import push_round

    for key, value in env(project.parent).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts connections; nobody answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for args in (
            ["remote", "add", "silent", "s3://rounds/silent"],
            ["remote", "modify", "silent", "endpointurl", url],
        ):
            subprocess.run([BIN / "dvc", *args], cwd=project, check=True)
        said, began = [], time.monotonic()
        try:
            with pytest.raises(UserError) as e:
                push_round("r00", "silent", timeout=4, say=said.append)
        finally:
            subprocess.run([BIN / "dvc", "remote", "remove", "silent"], cwd=project, check=True)
        took = time.monotonic() - began
    assert said[0].startswith("pushing r00 (") and said[0].endswith("to remote 'silent' (s3://rounds/silent)")
    assert str(e.value).startswith("dvc push of r00 to remote 'silent' (s3://rounds/silent) failed: ")
    assert str(e.value).endswith("(storage.timeout: 4 s)") and "\n" not in str(e.value)
    assert took < 4 + 6, took  # the timeout, and the dvc commands that find the remote (about a second each)


def test_publish_uploads_a_round_with_checksums_and_then_skips_it(project, s3):
    s3c = client(s3)
    s3c.create_bucket(Bucket="published")
    assert run(["rlhf", "report"], project).returncode == 0  # a round's report goes with it
    out = run(["rlhf", "publish", "--round", "r01", "s3://published/team", "--endpoint-url", s3], project)
    assert out.returncode == 0, out.stderr
    r01 = project / "data" / "rounds" / "r01"
    local = {f"team/r01/{name}": r01 / name for name in ("metrics.json", "eval_samples.jsonl", "landscape.json")}
    for folder in ("policy", "reward_model"):
        local.update({f"team/r01/{f.relative_to(r01).as_posix()}": f for f in (r01 / folder).rglob("*") if f.is_file()})
    local.update({f"team/r01/report/{f.name}": f for f in (project / "reports").glob("*") if f.is_file()})
    assert "team/r01/policy/model.safetensors" in local and "team/r01/report/report.html" in local
    listed = s3c.list_objects_v2(Bucket="published", Prefix="team/")["Contents"]
    assert {o["Key"] for o in listed} == set(local)
    for key, path in local.items():
        head = s3c.head_object(Bucket="published", Key=key, ChecksumMode="ENABLED")
        sha = hashlib.sha256(path.read_bytes())
        assert head["Metadata"]["sha256"] == sha.hexdigest() and head["ContentLength"] == path.stat().st_size
        assert "ChecksumSHA256" in head  # S3 checked the upload against it
    assert f"{len(local)} files uploaded, 0 already there unchanged" in out.stdout

    s3c.put_object(Bucket="published", Key="team/r01/metrics.json", Body=b"{}")  # changed there: sent again
    again = run(["rlhf", "publish", "--round", "r01", "s3://published/team", "--endpoint-url", s3], project)
    assert again.returncode == 0, again.stderr
    sent = [line for line in again.stdout.splitlines() if line.startswith("uploaded")]
    assert len(sent) == 1 and sent[0].startswith("uploaded s3://published/team/r01/metrics.json ")
    assert f"1 files uploaded, {len(local) - 1} already there unchanged" in again.stdout
    body = s3c.get_object(Bucket="published", Key="team/r01/metrics.json")["Body"].read()
    assert body == (r01 / "metrics.json").read_bytes()


def test_large_files_go_up_in_parts_with_their_sha256(tmp_path, s3, monkeypatch):
    from rlhf.orchestration.storage import publish

    for key, value in env(tmp_path).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    r01 = tmp_path / "data" / "rounds" / "r01"
    (r01 / "policy").mkdir(parents=True)
    (r01 / "metrics.json").write_text("{}")
    weights = os.urandom(11 * 2**20)
    (r01 / "policy" / "model.safetensors").write_bytes(weights)
    client(s3).create_bucket(Bucket="large")
    done = publish("r01", "s3://large/x", s3, project=tmp_path, multipart_mib=5, log=lambda line: None)
    assert sorted(done["uploaded"]) == ["x/r01/metrics.json", "x/r01/policy/model.safetensors"]
    head = client(s3).head_object(Bucket="large", Key="x/r01/policy/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of at most 5 MiB
    assert head["Metadata"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert client(s3).get_object(Bucket="large", Key="x/r01/policy/model.safetensors")["Body"].read() == weights


def test_a_published_lora_round_loads_from_the_s3_copy_alone(tmp_path, s3, monkeypatch):
    """A LoRA round's adapter names round 0's policy by a path on this machine. Published, it carries that base
    (base/, named `../base` from the adapter's folder) and loads from a download of the prefix alone, by the
    project's loader and by PEFT's, giving the round's own outputs; with round 0 copied from a hub id it names
    that id and carries nothing. The round's own files stay as they were."""
    import json

    import torch
    from peft import AutoPeftModelForCausalLM, get_peft_model

    from rlhf.core.config import Lora, TinyModel
    from rlhf.core.paths import SFT, round_paths
    from rlhf.ml import models
    from rlhf.ml.policy import lora_config
    from rlhf.orchestration.storage import publish

    for key, value in env(tmp_path).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    tok = models.build_tokenizer(["a b c d e f g h"])
    torch.manual_seed(0)
    models.save(
        models.build_tiny_lm(tok, TinyModel(hidden_size=16, layers=1, heads=2, intermediate_size=32)), tok, SFT.policy
    )
    policy = get_peft_model(models.load_policy(SFT.policy), lora_config(Lora(rank=2)))
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_()  # an adapter that changes what the base says
    r01 = round_paths("r01")
    models.save(policy, tok, r01.policy)
    r01.metrics.write_text("{}")
    local_config = (r01.policy / "adapter_config.json").read_bytes()
    assert json.loads(local_config)["base_model_name_or_path"] == str(SFT.policy)  # a path on this machine
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want, bare = models.load_policy(r01.policy)(ids).logits, models.load_policy(SFT.policy)(ids).logits
    assert not torch.allclose(want, bare)

    s3c = client(s3)
    s3c.create_bucket(Bucket="lora")
    publish("r01", "s3://lora/x", s3, log=lambda line: None)
    copy = tmp_path / "download"
    for obj in s3c.list_objects_v2(Bucket="lora", Prefix="x/")["Contents"]:
        (copy / obj["Key"]).parent.mkdir(parents=True, exist_ok=True)
        (copy / obj["Key"]).write_bytes(s3c.get_object(Bucket="lora", Key=obj["Key"])["Body"].read())
    published = copy / "x" / "r01"
    assert json.loads((published / "policy/adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    assert (published / "base" / "model.safetensors").read_bytes() == (SFT.policy / "model.safetensors").read_bytes()
    assert (r01.policy / "adapter_config.json").read_bytes() == local_config

    monkeypatch.chdir(tmp_path)  # away from the project: nothing of it is at hand
    with torch.no_grad():
        assert torch.allclose(models.load_policy(published / "policy")(ids).logits, want)
        monkeypatch.chdir(published / "policy")
        peft = AutoPeftModelForCausalLM.from_pretrained(".")(ids).logits  # the adapter unmerged: float rounding apart
        assert (peft - want).abs().max() < 1e-5 and not torch.allclose(peft, bare)

    monkeypatch.chdir(tmp_path / "project")  # round 0 copied from a hub id, as dvc.lock or params.yaml says
    Path("params.yaml").write_text("rounds: {r01: r00}\nprepare: {policy: org/sft-policy}\n")
    done = publish("r01", "s3://lora/hub", s3, log=lambda line: None)
    assert not [key for key in done["uploaded"] if key.startswith("hub/r01/base/")]
    config = s3c.get_object(Bucket="lora", Key="hub/r01/policy/adapter_config.json")["Body"].read()
    assert json.loads(config)["base_model_name_or_path"] == "org/sft-policy"


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A second moto_server that checks credentials (IAM auth on from the first request): ours are unknown."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto-auth"), INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield url
    stop(proc, timeout=30)


@pytest.mark.parametrize("case", ["unreachable", "missing bucket", "bad credentials", "not a round", "not an s3 url"])
def test_publish_and_remote_errors_are_one_line_and_change_nothing(project, s3, strict_s3, case):
    dead = f"http://127.0.0.1:{free_port()}"
    dest, endpoint, rnd, expected = {
        "unreachable": ("s3://published/x", dead, "r01", f"s3://published/x: cannot connect to the S3 endpoint {dead}"),
        "missing bucket": (
            "s3://no-such-bucket/x",
            s3,
            "r01",
            f"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist at {s3}",
        ),
        "bad credentials": (
            "s3://published/x",
            strict_s3,
            "r01",
            f"s3://published/x: access denied at {strict_s3} (403): check the credentials",
        ),
        "not a round": (
            "s3://published/x",
            s3,
            "r07",
            "data/rounds/r07/metrics.json: no such file; round r07 has not completed",
        ),
        "not an s3 url": ("published/x", s3, "r01", "published/x: not an S3 URI (expected s3://bucket/prefix)"),
    }[case]
    before = digest(project / "data" / "rounds"), (project / ".dvc" / "config").read_text()
    out = run(["rlhf", "publish", "--round", rnd, dest, "--endpoint-url", endpoint], project)
    assert one_line_error(out) == f"error: {expected}"
    if case != "not a round":  # `rlhf remote` checks the bucket the same way before it configures anything
        out = run(["rlhf", "remote", dest, "--endpoint-url", endpoint], project)
        assert one_line_error(out) == f"error: {expected}"
    assert (digest(project / "data" / "rounds"), (project / ".dvc" / "config").read_text()) == before


def test_prompt_sets_from_s3_are_read_checked_and_tracked_by_dvc(tiny_project, tmp_path, s3):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    s3c = client(s3)
    s3c.create_bucket(Bucket="prompts")
    s3c.put_object(Bucket="prompts", Key="eval.jsonl", Body=(project / "data/prompts/eval.jsonl").read_bytes())
    s3c.put_object(Bucket="prompts", Key="bad.jsonl", Body=b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    endpoint = {"AWS_ENDPOINT_URL": s3}  # read by boto3 and by DVC alike

    set_params(project, lambda p: p["prompts"].update(eval="s3://prompts/eval.jsonl"))
    out = run(["rlhf", "check"], project, **endpoint)
    assert out.returncode == 0 and "params.yaml: ok" in out.stdout, out.stderr
    # DVC records the object (by its ETag) as a dependency of the stages that read it, and sees it change
    assert run(["rlhf", "stages"], project, **endpoint).returncode == 0  # params changed: dvc.yaml follows
    assert run(["dvc", "commit", "-f", "-q"], project, **endpoint).returncode == 0
    assert "path: s3://prompts/eval.jsonl" in (project / "dvc.lock").read_text()
    assert "up to date" in run(["dvc", "status"], project, **endpoint).stdout
    s3c.put_object(Bucket="prompts", Key="eval.jsonl", Body=(project / "data/prompts/label.jsonl").read_bytes())
    status = run(["dvc", "status"], project, **endpoint).stdout
    assert "modified:" in status and "s3://prompts/eval.jsonl" in status

    for uri, expected in (
        ("s3://prompts/nope.jsonl", f"s3://prompts/nope.jsonl: no such object at {s3}"),
        ("s3://prompts/bad.jsonl", "s3://prompts/bad.jsonl:2: malformed JSON"),
    ):
        set_params(project, lambda p, uri=uri: p["prompts"].update(eval=uri))
        assert expected in one_line_error(run(["rlhf", "check"], project, **endpoint))


@pytest.mark.parametrize(
    "storage, message",
    [
        ({"push": True}, "storage.push: the project has no default DVC remote; add one with `rlhf remote s3://"),
        ({"push": True, "remote": "backup"}, "storage.remote: no DVC remote 'backup' (have: none)"),
    ],
)
def test_pushing_to_no_remote_is_refused_before_anything_runs(tmp_path, storage, message):
    project = make_project(tmp_path / "project", TINY)
    set_params(project, lambda p: p.update(storage=storage))
    assert one_line_error(run(["rlhf", "run"], project)).startswith(f"error: {message}")
    assert not (project / "data" / "rounds").exists()


@pytest.mark.parametrize("command", ["remote", "publish"])
def test_storage_commands_have_help(tmp_path, command):
    out = subprocess.run([BIN / "rlhf", command, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: rlhf {command}")
    assert "s3://bucket/prefix" in out.stdout
