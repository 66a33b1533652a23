"""Each policy-update method runs the offline default for 3 rounds and raises the held-out gold score.
Slow: the methods share one full-size project (prepare and round 1's data and RM are reused), and
each switches `update_policy.method` and runs `dvc repro`, as a study would. DPO is the full demo."""

import json
import math
import subprocess

import pytest
import yaml

from tests.conftest import BIN, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("methods") / "project", subset=False)


@pytest.mark.parametrize("method", ["ppo", "rest", "rloo"])
def test_method_raises_gold_over_three_rounds(project, method):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["update_policy"]["method"] = method
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([BIN / "dvc", "repro"], cwd=project, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Stage 'update_policy@r01' didn't change" not in out.stdout  # the method really ran

    rounds = {r: json.loads((project / f"data/rounds/{r}/metrics.json").read_text()) for r in ("r00", "r01", "r02", "r03")}
    r0, r3 = rounds["r00"]["gold"], rounds["r03"]["gold"]
    assert r3["mean"] - r0["mean"] > 3 * math.hypot(r0["sem"], r3["sem"]), (method, r0, r3)
    for m in rounds.values():
        assert m["kl"]["per_sequence"] >= 0 and m["kl"]["per_token"] >= 0
