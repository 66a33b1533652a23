"""One round of the tiny project through the Prefect flow, each step as its DVC stage."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from rlhf.core.paths import ROUND_STEPS
from rlhf.core.processes import free_port, stop
from tests.conftest import BIN, TINY, make_project

EXPECTED_TASKS = {"r00-prepare", *(f"r01-{step}" for step in ROUND_STEPS)}


def dvc(*args, cwd):
    return subprocess.run([BIN / "dvc", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def outputs(project):
    return {p: p.stat().st_mtime_ns for p in (project / "data" / "rounds").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rlhf server` in a fresh project, as a user starts it; stopped (SIGTERM) when the module is done."""
    project = make_project(tmp_path_factory.mktemp("flow") / "project", TINY)
    port = free_port()
    log = project.parent / "server.log"
    proc = subprocess.Popen(
        [BIN / "rlhf", "server", "--port", str(port)], cwd=project, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    record = project / ".prefect" / "server.json"
    deadline = time.monotonic() + 120
    while not record.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    yield project, json.loads(record.read_text())["api_url"], proc
    stop(proc, timeout=30)


@pytest.fixture(scope="module")
def flow_run(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project, api_url, _ = server
    with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: api_url}):
        mp.chdir(project)
        from flows.iterate import iterate

        rows = iterate()
        first = outputs(project)
        again = iterate()  # everything is up to date: DVC skips every stage
        with get_client(sync_client=True) as client:
            flows = client.read_flow_runs()
            tasks = client.read_task_runs()
            artifacts = client.read_artifacts()
    return project, rows, again, first, flows, tasks, artifacts


def test_flow_records_every_step_as_a_completed_task_run(flow_run):
    _, _, _, _, flows, tasks, _ = flow_run
    assert len(flows) == 2 and all(f.state.is_completed() for f in flows)
    assert [f.name for f in flows] == ["r01", "r01"]  # a run is named by the rounds it runs
    by_run: dict = {}
    for t in tasks:
        by_run.setdefault(t.flow_run_id, []).append(t.name)
    assert sorted(map(sorted, by_run.values())) == [sorted(EXPECTED_TASKS)] * 2
    assert all(t.state.is_completed() for t in tasks), [(t.name, t.state.name) for t in tasks]


def test_dvc_records_the_round_and_is_clean(flow_run):
    project = flow_run[0]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", *(f"{s}@r01" for s in ROUND_STEPS)}
    assert "up to date" in dvc("status", cwd=project)
    repro = dvc("repro", cwd=project)
    assert "didn't change" in repro and "Running stage" not in repro


def test_rerun_skips_finished_stages_and_returns_the_table(flow_run):
    project, rows, again, first, *_ = flow_run
    assert [r["round"] for r in rows] == ["r00", "r01"] == [r["round"] for r in again]
    assert outputs(project) == first  # nothing was rewritten
    metrics = json.loads((project / "data/rounds/r01/metrics.json").read_text())
    assert rows[1] == metrics and "proxy" in metrics


def test_each_round_is_published_as_prefect_artifacts(flow_run):
    project, *_, artifacts = flow_run
    by_key = {a.key: a for a in artifacts}
    assert {"r00-metrics", "r00-summary", "r01-metrics", "r01-summary", "rounds"} <= set(by_key)
    table = {row["metric"]: row["value"] for row in json.loads(by_key["r01-metrics"].data)}
    metrics = json.loads((project / "data/rounds/r01/metrics.json").read_text())
    assert table["gold.mean"] == metrics["gold"]["mean"] and "win_rate.vs_sft.mean" in table
    assert "## Round r01" in by_key["r01-summary"].data and "| prompt | response | gold |" in by_key["r01-summary"].data
    assert "r01" in by_key["rounds"].data


def test_report_opens_offline_and_its_plots_render(flow_run):
    import base64
    import io
    import re

    import matplotlib.image

    project = flow_run[0]
    page = (project / "reports" / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing to fetch: it opens offline
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) >= 4 and "Reward landscape (r01)" in page  # 3 plots per round + the heatmaps
    for data in images:  # each plot decodes and renders to a real image
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0
    assert "Sample responses" in page and "r01" in page
    csv = (project / "reports" / "rounds.csv").read_text().splitlines()
    assert csv[0].startswith("round,gold,") and [line.split(",")[0] for line in csv[1:]] == ["r00", "r01"]


def test_dvc_metrics_and_plots_cover_every_round(flow_run):
    project = flow_run[0]
    shown = dvc("metrics", "show", cwd=project)
    assert "data/rounds/r00/metrics.json" in shown and "data/rounds/r01/metrics.json" in shown
    plots = json.loads(dvc("plots", "show", "--json", cwd=project))["data"]
    assert {"gold_and_proxy_per_round", "gold_against_distance", "rm_accuracy_and_win_rates"} <= set(plots)


def test_rlhf_server_listens_on_loopback_only(server):
    import psutil

    _, api_url, proc = server
    port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    listening = [
        c.laddr
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [a.ip for a in listening] == ["127.0.0.1"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.mark.skipif(
    not CHROMIUM, reason="no chromium on PATH (`make test` installs Debian's chromium when run as root)"
)
def test_dashboard_page_of_a_flow_run_shows_its_round_tasks(flow_run, server):
    """Headless Chromium renders the Prefect UI page of the finished run: its name, state and task runs."""
    flows = flow_run[4]
    url = f"{server[1].removesuffix('/api')}/runs/flow-run/{flows[-1].id}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flow-run.png"
    browse = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={ARTIFACTS / 'chromium-profile'}",
        "--virtual-time-budget=20000",
        "--window-size=1400,1000",
    ]
    dom = subprocess.run([*browse, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    subprocess.run([*browse, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    shutil.rmtree(ARTIFACTS / "chromium-profile", ignore_errors=True)
    assert "iterated-rlhf" in dom and "Completed" in dom, dom[-2000:]
    shown = {name for name in EXPECTED_TASKS if name in dom}
    # The timeline is a canvas; names reach the DOM through the first page of logs, the count through the header.
    assert f"{len(EXPECTED_TASKS)} Task runs" in dom and {"r00-prepare", "r01-generate"} <= shown, shown
    assert shot.stat().st_size > 20_000  # a rendered page, kept for people to look at


def test_a_stage_rerun_bit_for_bit_leaves_its_output_on_disk_once(server, flow_run):
    """DVC links back only outputs new to its cache; the flow links a reproduced one too (flows/iterate.py)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project, api_url, _ = server
    model = project / "data/rounds/r01/reward_model/model.safetensors"
    before = model.stat().st_ino  # DVC's cache holds this inode
    with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: api_url}):
        mp.chdir(project)
        from flows.iterate import stage

        assert stage("train_rm", "r01", force=True)  # ran: the same bytes again
    assert (model.stat().st_ino, model.stat().st_nlink) == (before, 2)  # the cached copy, linked back
    assert "up to date" in dvc("status", cwd=project)
