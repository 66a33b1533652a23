"""`rlhf verify` finds what `dvc status` cannot: an output changed in place with its size and modification time
kept, which DVC's cache of hashes trusts. A quick project (tests/faults.py) after one `rlhf run`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import BIN
from tests.faults import env_for, quick_project


def run(*args, cwd, env):
    return subprocess.run([BIN / args[0], *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    project = quick_project(base / "project")
    env = env_for(base)
    done = run("rlhf", "run", cwd=project, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return project, env


def flip(path, offset: int) -> bytes:
    """Change one byte of `path` in place, keeping its size and modification time; returns the old content."""
    before = path.read_bytes()
    stat = path.stat()
    changed = bytearray(before)
    changed[offset] = ord("0") if changed[offset] != ord("0") else ord("1")
    path.write_bytes(bytes(changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return before


def restore(path, before: bytes) -> None:
    stat = path.stat()
    path.write_bytes(before)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_untouched_project_verifies(project):
    project, env = project
    out = run("rlhf", "verify", cwd=project, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().startswith("dvc.lock: all ") and out.stdout.strip().endswith(" outputs match")


def test_a_byte_changed_in_place_is_named_with_its_stage(project):
    project, env = project
    labels = project / "data" / "rounds" / "r01" / "labels.jsonl"
    text = labels.read_bytes()
    before = flip(labels, text.index(b'"gold": [') + len(b'"gold": ['))  # a gold score's first digit
    try:
        assert "up to date" in run("dvc", "status", cwd=project, env=env).stdout  # what DVC's stat check sees
        out = run("rlhf", "verify", cwd=project, env=env)
    finally:
        restore(labels, before)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "data/rounds/r01/labels.jsonl: content differs (label@r01)",
        f"dvc.lock: 1 of {count_outputs(project)} outputs differ",
    ]


def test_a_file_changed_inside_a_model_folder_is_named(project):
    project, env = project
    config = project / "data" / "rounds" / "r01" / "reward_model" / "config.json"
    text = config.read_bytes()
    before = flip(config, text.index(b"0"))
    try:
        out = run("rlhf", "verify", cwd=project, env=env)
    finally:
        restore(config, before)
    assert out.returncode == 1
    assert out.stdout.splitlines()[0] == "data/rounds/r01/reward_model/config.json: content differs (train_rm@r01)"


def test_what_dvcignore_names_inside_an_output_is_no_difference(project):
    """A tool that writes __pycache__ (named in .dvcignore) into a model folder changes nothing DVC tracks; a
    file .dvcignore does not name is reported."""
    project, env = project
    model = project / "data" / "rounds" / "r01" / "reward_model"
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "modeling.cpython-311.pyc").write_bytes(b"\0")
    try:
        out = run("rlhf", "verify", cwd=project, env=env)
        status = run("dvc", "status", cwd=project, env=env)
        (model / "notes.txt").write_text("mine")
        extra = run("rlhf", "verify", cwd=project, env=env)
    finally:
        shutil.rmtree(model / "__pycache__")
        (model / "notes.txt").unlink(missing_ok=True)
    assert "up to date" in status.stdout
    assert out.returncode == 0, out.stdout
    assert extra.returncode == 1
    assert extra.stdout.splitlines()[0] == "data/rounds/r01/reward_model/notes.txt: not in dvc.lock (train_rm@r01)"


def count_outputs(project) -> int:
    import yaml

    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return sum(len(s.get("outs", [])) for s in stages.values())


def test_verify_has_help(tmp_path):
    out = subprocess.run([BIN / "rlhf", "verify", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "dvc.lock" in out.stdout
