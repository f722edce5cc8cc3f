"""The Ray Jobs backend without a Ray head: the request it builds, secrets, errors, stop, timeouts.

Error paths use tiny real HTTP servers on loopback that answer like a broken
or protected dashboard would; stop and the log stream use one that keeps a
job whose state the test drives; timeouts use sockets that never answer.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sft_cluster.launch import LaunchError
from sft_cluster.launch.ray_client import TIMEOUT_ENV
from sft_cluster.launch.ray_jobs import ENTRYPOINT, JOB_ENV, RayJobsBackend, _state
from sft_cluster.launch.ray_rundir import run_dir
from sft_cluster.spec import RayCluster, StorageSpec, dump_job_yaml, load_job
from sft_cluster.tracking import RUN_ID_ENV
from tests.conftest import REPO, isolated_environment, run_cli
from tests.fixtures.ray_head import free_ports

TOKEN = "tok-" + "9" * 28


def backend(**fields) -> RayJobsBackend:
    return RayJobsBackend(RayCluster.model_validate({"kind": "ray", **fields}), "c.yaml")


@pytest.fixture
def job():
    return load_job(REPO / "jobs" / "smoke.yaml", ["train.max_steps=3"])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)


# --- address and token -------------------------------------------------------------


def test_address_from_the_file_then_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-ray-address:8265")
    assert backend(address="http://file:8265").address() == ("http://file:8265", "c.yaml")
    assert backend().address() == ("http://from-ray-address:8265", "$RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert backend().address()[0] == "http://api:8265"


def test_no_address_anywhere_is_a_clear_error():
    with pytest.raises(LaunchError, match="no Ray address"):
        backend().address()


def test_token_from_env_then_file(monkeypatch, tmp_path):
    assert backend(address="http://h:1").token() is None  # auth.mode none
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert backend(auth={"mode": "token", "token_file": str(file)}).token() == TOKEN
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert (
        backend(auth={"mode": "token", "token_env": "MY_TOKEN", "token_file": str(file)}).token()
        == "from-env"
    )


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"mode": "token"}, r"\$RAY_AUTH_TOKEN is not set"),
        ({"mode": "token", "token_file": "/nonexistent/token"}, "cannot read it"),
    ],
)
def test_missing_token_is_a_clear_error(auth, message):
    with pytest.raises(LaunchError, match=message):
        backend(auth=auth).token()


# --- the request ---------------------------------------------------------------------


def test_request_carries_the_resolved_job_and_no_token(monkeypatch, job, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("OTHER", "not passed")
    monkeypatch.chdir(tmp_path)
    b = backend(
        address="http://h:8265",
        auth={"mode": "token"},
        runtime_env={"pass_env": ["AWS_*", "RAY_*", "*TOKEN*"], "env_vars": {"A": "1"}},
        metadata={"team": "t"},
        entrypoint_resources={"head": 1},
    )
    request = b.plan(job.model_copy(update={"output_uri": "runs/x"})).kwargs()
    assert request["entrypoint"] == ENTRYPOINT
    env = request["runtime_env"]
    assert env["working_dir"] == str(tmp_path)  # from the current directory
    assert ".venv" in env["excludes"]
    assert env["env_vars"]["A"] == "1"
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert "OTHER" not in env["env_vars"]
    assert "RAY_AUTH_TOKEN" not in env["env_vars"]
    assert TOKEN not in json.dumps(request)
    sent = yaml.safe_load(env["env_vars"][JOB_ENV])
    assert sent["train"]["max_steps"] == 3
    assert sent["output_uri"] == str(tmp_path / "runs" / "x")  # not Ray's scratch working_dir
    assert request["metadata"] == {
        "team": "t",
        "job_name": "smoke",
        "output_uri": str(tmp_path / "runs" / "x"),
        "launcher": "sft-cluster",
    }
    assert request["entrypoint_num_cpus"] == 0
    assert request["entrypoint_resources"] == {"head": 1}
    assert request["submission_id"].startswith("smoke-")
    # The driver honours a stop request only when it names this run.
    assert env["env_vars"][RUN_ID_ENV] == request["submission_id"]


def test_job_yaml_round_trips_through_the_driver(job, tmp_path):
    request = backend(address="http://h:1").plan(job)
    path = tmp_path / "job.yaml"
    path.write_text(request.runtime_env["env_vars"][JOB_ENV])
    assert load_job(path) == request.job
    assert load_job(path) == job.model_copy(update={"output_uri": str(Path(job.output_uri).absolute())})


def test_dry_run_redacts(monkeypatch, job):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    b = backend(
        address="https://user:hunter2@h:8265",
        auth={"mode": "token"},
        runtime_env={"pass_env": ["AWS_*", "HF_TOKEN"]},
    )
    request, strategy = b.plan(job).dry_run()
    assert request.verbatim and not request.stderr  # on stdout as it is, to be piped
    assert strategy.stderr and strategy.text.startswith("# strategy.json")
    text = request.text
    assert "aws-secret-value" not in text and TOKEN not in text and "hunter2" not in text
    assert "<redacted: $AWS_SECRET_ACCESS_KEY" in text
    assert "token from $RAY_AUTH_TOKEN" in text
    assert "not set here, not passed: HF_TOKEN" in text
    assert ENTRYPOINT in text and "max_steps: 3" in text
    shown = json.loads(text[text.index("{") : text.index("\n}\n") + 2])
    assert shown["runtime_env"]["env_vars"][RUN_ID_ENV] == shown["submission_id"]  # not a secret


# --- the state of a job, from the job-info objects Ray's client returns ------------------


def _info(status: str, **fields: object) -> SimpleNamespace:
    from ray.job_submission import JobStatus

    info = {
        "status": JobStatus(status),
        "submission_id": "j1",
        "job_id": "02000000",
        "metadata": {"launcher": "sft-cluster", "job_name": "smoke", "output_uri": "/runs/smoke"},
        "message": None,
        "driver_exit_code": None,
        "start_time": 1_700_000_000_000,  # Ray's times are milliseconds
        "end_time": None,
    }
    return SimpleNamespace(**{**info, **fields})


def test_state_succeeded() -> None:
    info = _info(
        "SUCCEEDED", message="Job finished successfully.", driver_exit_code=0, end_time=1_700_000_060_000
    )
    state = _state(info)
    assert (state.id, state.state, state.name, state.output_uri) == (
        "j1",
        "SUCCEEDED",
        "smoke",
        "/runs/smoke",
    )
    assert (state.start, state.end, state.exit_code, state.message) == (1_700_000_000, 1_700_000_060, 0, None)
    assert state.finished and state.succeeded


def test_state_failed_keeps_the_first_line_of_rays_message() -> None:
    info = _info(
        "FAILED", message="Job entrypoint command failed with exit code 1\nlast lines", driver_exit_code=1
    )
    state = _state(info)
    assert (state.state, state.exit_code) == ("FAILED", 1)
    assert state.message == "Job entrypoint command failed with exit code 1"
    assert state.finished and not state.succeeded


def test_state_exit_75_is_preempted_for_our_jobs_only() -> None:
    ours = _state(_info("FAILED", message="exit code 75", driver_exit_code=75))
    assert (ours.state, ours.exit_code, ours.message) == ("PREEMPTED", 75, None)
    assert ours.finished and not ours.succeeded
    theirs = _state(_info("FAILED", message="exit code 75", driver_exit_code=75, metadata={"job_name": "x"}))
    assert (theirs.state, theirs.message) == ("FAILED", "exit code 75")
    bare = _state(_info("FAILED", driver_exit_code=75, metadata=None))
    assert (bare.state, bare.name, bare.output_uri) == ("FAILED", None, None)


def test_state_pending_and_stopped() -> None:
    pending = _state(_info("PENDING", message="Job has not started yet.", start_time=None))
    assert (pending.state, pending.start, pending.message) == ("PENDING", None, "Job has not started yet.")
    assert not pending.finished
    stopped = _state(_info("STOPPED", message="Job was intentionally stopped.", driver_exit_code=-15))
    assert (stopped.state, stopped.exit_code) == ("STOPPED", -15) and stopped.finished


def test_state_of_a_job_not_submitted_as_a_submission_takes_the_job_id() -> None:
    assert _state(_info("RUNNING", submission_id=None)).id == "02000000"


# --- errors from a dashboard that is not right --------------------------------------


@pytest.fixture
def fake_dashboard() -> Iterator:
    """``start(status, body)``: an HTTP server answering every request the same way."""
    servers = []

    def start(status: int, body: str) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(
    ("status", "body", "auth", "message"),
    [
        (404, "Not Found", {}, "has no Ray Jobs API"),
        (401, "Unauthorized: Missing authentication token", {}, "requires a token"),
        (403, "Forbidden: Invalid authentication token", {"mode": "token"}, "rejected the token"),
        (200, "<html>not a dashboard</html>", {}, "does not answer like a Ray dashboard"),
    ],
)
def test_wrong_dashboards(fake_dashboard, monkeypatch, status, body, auth, message):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    b = backend(address=fake_dashboard(status, body), auth=auth)
    with pytest.raises(LaunchError, match=message) as info:
        b.list()
    assert "\n" not in str(info.value)
    assert TOKEN not in str(info.value)


def test_unreachable(job):
    (port,) = free_ports(1)
    with pytest.raises(LaunchError, match=f"cannot reach the Ray cluster at http://127.0.0.1:{port}"):
        b = backend(address=f"http://127.0.0.1:{port}")
        b.launch(b.plan(job))


def test_file_address_wins_over_ray_address(fake_dashboard, monkeypatch):
    (port,) = free_ports(1)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")  # nothing there
    with pytest.raises(LaunchError, match="has no Ray Jobs API"):  # the file's server answered
        backend(address=fake_dashboard(404, "Not Found")).list()
    import os

    assert os.environ["RAY_ADDRESS"] == f"http://127.0.0.1:{port}"  # restored


# --- the CLI, as a user runs it ------------------------------------------------------


def test_cli_dry_run_contacts_nothing_and_errors_are_one_line(tmp_path):
    (port,) = free_ports(1)
    cluster = tmp_path / "ray.yaml"
    cluster.write_text(f"kind: ray\naddress: http://127.0.0.1:{port}\n")
    env = isolated_environment(tmp_path / "home")
    env["SFT_CLUSTER_STATE_DIR"] = str(tmp_path / "state")
    dry = run_cli(["submit", "jobs/smoke.yaml", "--cluster", str(cluster), "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert ENTRYPOINT in dry.stdout
    real = run_cli(["submit", "jobs/smoke.yaml", "--cluster", str(cluster)], env)
    assert real.returncode == 2
    assert real.stderr.startswith("error: cannot reach") and "Traceback" not in real.stderr
    assert not (tmp_path / "state").exists()  # nothing remembered: nothing was submitted


def test_example_cluster_files_are_valid():
    for name in ("ray-local.yaml", "ray-prod.yaml"):
        from sft_cluster.spec import load_cluster

        spec = load_cluster(REPO / "cluster_configs" / name)
        assert spec.kind == "ray"
    assert load_cluster(REPO / "cluster_configs" / "ray-prod.yaml").auth.mode == "token"


# --- stop, the log stream and outcomes, against a dashboard with one job ------------


class JobDashboard:
    """A loopback dashboard holding one job whose state the test sets.

    ``on_info`` runs before each answer about the job (a stand-in for the driver).
    The log stream (a websocket) is accepted and never answered; with
    ``dies_on_tail`` the whole server stops answering from then on.
    """

    def __init__(self, **job: object):
        self.job = {"type": "SUBMISSION", "submission_id": "j1", "entrypoint": ENTRYPOINT, **job}
        self.job.setdefault("metadata", {"launcher": "sft-cluster", "job_name": "smoke"})
        self.on_info: Callable[[dict], None] = lambda job: None
        self.stop_calls = 0
        self.dies_on_tail = False
        self.dead = False
        self.release = threading.Event()
        dashboard = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, data: object, status: int = 200) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if dashboard.dead or self.path.endswith("/logs/tail"):
                    dashboard.dead = dashboard.dead or dashboard.dies_on_tail
                    dashboard.release.wait()  # accepted, never answered
                    return
                if self.path == "/api/version":
                    return self._json({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})
                if self.path == "/api/jobs/j1":
                    dashboard.on_info(dashboard.job)
                    return self._json(dashboard.job)
                if self.path == "/api/jobs/j1/logs":
                    return self._json({"logs": "step 1/9\nboom\n"})
                return self._json({"detail": "no such job"}, 404)

            def do_POST(self):
                if self.path == "/api/jobs/j1/stop":
                    dashboard.stop_calls += 1
                    dashboard.job.update(status="STOPPED", driver_exit_code=-15)
                    return self._json({"stopped": True})
                return self._json({}, 404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboard() -> Iterator[Callable[..., JobDashboard]]:
    made: list[JobDashboard] = []

    def make(**job: object) -> JobDashboard:
        made.append(JobDashboard(**job))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _running(job_obj, output_uri: str) -> dict:
    """The job fields of a running job of ours writing to ``output_uri``."""
    job_yaml = dump_job_yaml(job_obj.model_copy(update={"output_uri": output_uri}))
    return {
        "status": "RUNNING",
        "metadata": {"launcher": "sft-cluster", "job_name": "smoke", "output_uri": output_uri},
        "runtime_env": {"env_vars": {JOB_ENV: job_yaml, RUN_ID_ENV: "j1"}},
    }


def test_graceful_stop_writes_the_request_and_waits_for_the_checkpoint(dashboard, job, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    d = dashboard(**_running(job, str(out)))

    def driver(state: dict) -> None:  # what the driver does when the request names its run
        request = out / "control" / "stop"
        if state["status"] == "RUNNING" and request.exists():
            assert json.loads(request.read_text())["run_id"] == "j1"
            (out / "summary.json").write_text(json.dumps({"status": "preempted", "steps": 7}))
            state.update(status="FAILED", driver_exit_code=75, message="exit code 75")

    d.on_info = driver
    b = backend(address=d.address)
    before = time.time()
    final = b.stop("j1")
    assert final.state == "PREEMPTED"
    assert final.message == f"checkpointed at step 7; resume with: sft-cluster resume {out} --cluster c.yaml"
    assert d.stop_calls == 0  # Ray's stop would have killed it before the commit
    request = json.loads((out / "control" / "stop").read_text())
    assert request["run_id"] == "j1" and before <= request["requested_at"] <= time.time()
    assert b.status("j1").state == "PREEMPTED"
    with pytest.raises(LaunchError, match="already PREEMPTED: nothing to stop"):
        b.stop("j1")


def test_graceful_stop_gives_up_after_the_wait(dashboard, job, tmp_path):
    d = dashboard(**_running(job, str(tmp_path)))
    with pytest.raises(LaunchError) as info:
        backend(address=d.address).stop("j1", wait_seconds=0.5)
    message = str(info.value)
    assert "has not ended 0.5 s after the stop request" in message
    assert "still checkpointing, or stuck" in message and "stop j1 --now" in message
    assert (tmp_path / "control" / "stop").exists() and d.stop_calls == 0


@pytest.mark.parametrize(
    ("output_uri", "says"),
    [
        ("nosuch://bucket/run", "cannot write the stop request to nosuch://bucket/run/control/stop"),
        ("/nonexistent/sftc/run", "/nonexistent/sftc/run is not a directory on this machine"),
    ],
)
def test_stop_request_that_cannot_reach_the_run_says_so(dashboard, job, output_uri, says):
    d = dashboard(**_running(job, output_uri))
    with pytest.raises(LaunchError) as info:
        backend(address=d.address).stop("j1")
    assert says in str(info.value) and "stop j1 --now" in str(info.value)
    assert "\n" not in str(info.value)
    assert d.stop_calls == 0 and d.job["status"] == "RUNNING"  # still running: nothing pretended
    assert not Path("/nonexistent").exists()


def test_stop_now_and_a_pending_job_use_rays_stop(dashboard, job, tmp_path):
    d = dashboard(**_running(job, str(tmp_path)))
    assert backend(address=d.address).stop("j1", now=True).state == "STOPPED"
    pending = dashboard(**{**_running(job, str(tmp_path)), "status": "PENDING"})
    assert backend(address=pending.address).stop("j1").state == "STOPPED"  # nothing to save yet
    assert d.stop_calls == pending.stop_calls == 1
    assert not (tmp_path / "control").exists()
    with pytest.raises(LaunchError, match="already STOPPED: nothing to stop"):
        backend(address=d.address).stop("j1", now=True)


def test_exit_code_75_is_preempted_only_for_our_jobs(dashboard, tmp_path):
    metadata = {"launcher": "sft-cluster", "output_uri": str(tmp_path)}
    ours = dashboard(status="FAILED", driver_exit_code=75, metadata=metadata)
    state = backend(address=ours.address).status("j1")
    assert state.state == "PREEMPTED"
    # No summary readable: nothing is claimed about the step.
    assert state.message == f"checkpointed; resume with: sft-cluster resume {tmp_path} --cluster c.yaml"
    foreign = dashboard(status="FAILED", driver_exit_code=75, metadata={})
    assert backend(address=foreign.address).status("j1").state == "FAILED"


def test_run_dir_takes_the_storage_options_of_the_jobs_own_yaml(job):
    uri = "s3://bucket/runs/x"
    fields = _running(job.model_copy(update={"storage": StorageSpec(endpoint_url="http://127.0.0.1:9")}), uri)
    run = run_dir(SimpleNamespace(**fields))
    assert run.uri == uri
    assert run.stop_request == f"{uri}/control/stop"
    assert run.options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    # Not an sft-cluster job YAML: the environment's settings (AWS_ENDPOINT_URL, ...).
    bare = run_dir(SimpleNamespace(metadata={"output_uri": uri}, runtime_env={}))
    assert "client_kwargs" not in bare.options


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = isolated_environment(tmp_path / "home")
    env.update(SFT_CLUSTER_STATE_DIR=str(tmp_path / "state"), **extra)
    return env


def _silent(address: str, cluster: Path) -> str:
    return f"the Ray cluster at {address} (address from {cluster}) did not answer within 2 s"


def _cluster_file(tmp_path: Path, address: str) -> Path:
    path = tmp_path / "ray.yaml"
    path.write_text(f"kind: ray\naddress: {address}\n")
    return path


@pytest.mark.parametrize(
    ("job_fields", "code", "says"),
    [
        ({"status": "SUCCEEDED"}, 0, "job j1: SUCCEEDED"),
        ({"status": "FAILED", "driver_exit_code": 75}, 75, "job j1: PREEMPTED  checkpointed"),
        ({"status": "FAILED", "driver_exit_code": 1}, 1, "job j1: FAILED"),
    ],
)
def test_follow_exits_with_the_outcome(dashboard, tmp_path, job_fields, code, says):
    """``logs --follow`` (as ``submit --follow``): 0, 75 for a checkpointed stop, 1; the stream
    never answers here, so it also ends because the job has ended."""
    d = dashboard(**job_fields)
    d.job["metadata"]["output_uri"] = str(tmp_path)
    cluster = _cluster_file(tmp_path, d.address)
    result = run_cli(
        ["logs", "j1", "--follow", "--cluster", str(cluster)], _cli_env(tmp_path, **{TIMEOUT_ENV: "2"})
    )
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stdout and "Traceback" not in result.stderr
    if code == 1:
        assert "exit code 1" in result.stderr and "boom" in result.stderr


def test_follow_fails_when_the_head_stops_answering_mid_stream(dashboard, tmp_path):
    d = dashboard(status="RUNNING")
    d.dies_on_tail = True  # answers until the log stream starts, then nothing
    cluster = _cluster_file(tmp_path, d.address)
    result = run_cli(
        ["logs", "j1", "--follow", "--cluster", str(cluster)],
        _cli_env(tmp_path, **{TIMEOUT_ENV: "2"}),
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {_silent(d.address, cluster)}")
    assert "Traceback" not in result.stderr


# --- every request has a timeout -------------------------------------------------------


@pytest.fixture
def silent_address() -> Iterator[Callable[[bool], str]]:
    """``make(drops)``: an address that accepts connections and never answers, or (``drops``)
    one whose accept queue is full, so new connections are never accepted."""
    sockets: list[socket.socket] = []

    def make(drops: bool) -> str:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(0 if drops else 16)  # never accept()ed, never read
        sockets.append(server)
        port = server.getsockname()[1]
        if drops:
            sockets.append(socket.create_connection(("127.0.0.1", port)))  # fills the queue
        return f"http://127.0.0.1:{port}"

    yield make
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("drops", [False, True], ids=["never-answers", "drops-connections"])
def test_an_address_that_never_answers_times_out(silent_address, tmp_path, drops):
    address = silent_address(drops)
    cluster = _cluster_file(tmp_path, address)
    env = _cli_env(tmp_path, **{TIMEOUT_ENV: "2"})
    for args in (["list"], ["stop", "j1"]):
        result = run_cli([*args, "--cluster", str(cluster)], env, timeout=60)  # it returns
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(f"error: {_silent(address, cluster)}"), result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_timeout_setting_must_be_positive_seconds(monkeypatch, value):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(LaunchError, match=f"{TIMEOUT_ENV} = '{value}': must be a positive number of seconds"):
        backend(address="http://127.0.0.1:9").list()
