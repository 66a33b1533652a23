"""`rlhf` as a user meets it: --help everywhere, and bad input is one line naming the key or path."""

import subprocess

import pytest

from rlhf.core.paths import STEPS
from tests.conftest import BIN, make_project


def rlhf(*args, cwd):
    return subprocess.run([BIN / "rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["run", "check", "metrics", "verify", "server", *STEPS])
def test_every_subcommand_has_help(tmp_path, command):
    out = rlhf(command, "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("usage: rlhf")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("cli") / "project")


def set_params(project, old, new):
    path = project / "params.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  seed: 0", "  seed: 0\n  sede: 1", "params.yaml: runtime.sede: unknown key"),
        ("  k: 8", "  k: eight", "params.yaml: generate.k: input should be a valid integer"),
        ("  threads: 2", "  threads: 0", "params.yaml: runtime.threads: input should be greater than or equal to 1"),
        (
            "  policy: tiny",
            "  policy: ./models/missing-sft",
            "prepare.policy: no such model directory: ./models/missing-sft",
        ),
        ("  eval: data/prompts/eval.jsonl", "  eval: data/prompts/nope.jsonl", "data/prompts/nope.jsonl: no such file"),
    ],
)
def test_run_rejects_bad_input_in_one_line(project, old, new, message):
    original = set_params(project, old, new)
    try:
        out = rlhf("run", cwd=project)
    finally:
        (project / "params.yaml").write_text(original)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip().removeprefix('error: ')}"]
    assert message in out.stderr and "Traceback" not in out.stderr


def test_zero_rounds_is_an_error(project):
    original = set_params(project, "rounds:\n  r01: r00\n  r02: r01\n  r03: r02\n", "rounds: {}\n")
    try:
        out = rlhf("run", cwd=project)
    finally:
        (project / "params.yaml").write_text(original)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: params.yaml: rounds: needs at least one round (r01: r00) — one entry per round, each naming the "
        "round it starts from (r01: r00, r02: r01, ...); `rlhf run --more N` adds entries (mapping of text to text)"
    )


def test_step_rejects_unknown_round(project):
    out = rlhf("generate", "r09", cwd=project)
    assert out.returncode == 2 and "no round 'r09'" in out.stderr and "Traceback" not in out.stderr


def test_malformed_world_file_is_caught_before_any_step(project):
    world = project / "data" / "world.json"
    original = world.read_text()
    world.write_text(original[:200])
    try:
        out = rlhf("run", cwd=project)
    finally:
        world.write_text(original)
    assert out.returncode == 2 and "data/world.json: not a valid world file" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (project / "data" / "rounds").exists()


def test_a_failing_stage_stops_the_run_with_its_message(project):
    pretrain = project / "data" / "pretrain.txt"
    original = pretrain.read_bytes()
    pretrain.write_bytes(b"\xff\xfe broken\n")
    try:
        out = rlhf("run", cwd=project)
    finally:
        pretrain.write_bytes(original)
    assert out.returncode == 2
    assert "error: stage prepare failed: data/pretrain.txt: not valid UTF-8 (byte 0)" in out.stderr.splitlines()
