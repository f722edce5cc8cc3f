"""The Ray Jobs backend without a Ray head: the request it builds, secrets, and its errors.

Error paths use tiny real HTTP servers on loopback that answer like a broken
or protected dashboard would.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sft_cluster.launch import LaunchError
from sft_cluster.launch.ray_jobs import ENTRYPOINT, JOB_ENV, RayJobsBackend
from sft_cluster.spec import RayCluster, load_job
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
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
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
    request = b.request(job.model_copy(update={"output_uri": "runs/x"}))
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


def test_job_yaml_round_trips_through_the_driver(job, tmp_path):
    request = backend(address="http://h:1").request(job)
    path = tmp_path / "job.yaml"
    path.write_text(request["runtime_env"]["env_vars"][JOB_ENV])
    assert load_job(path) == job.model_copy(update={"output_uri": str(Path(job.output_uri).absolute())})


def test_dry_run_redacts(monkeypatch, job):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    b = backend(
        address="https://user:hunter2@h:8265",
        auth={"mode": "token"},
        runtime_env={"pass_env": ["AWS_*", "HF_TOKEN"]},
    )
    text = b.submit(job, dry_run=True)
    assert isinstance(text, str)
    assert "aws-secret-value" not in text and TOKEN not in text and "hunter2" not in text
    assert "<redacted: $AWS_SECRET_ACCESS_KEY" in text
    assert "token from $RAY_AUTH_TOKEN" in text
    assert "not set here, not passed: HF_TOKEN" in text
    assert ENTRYPOINT in text and "max_steps: 3" in text


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
        backend(address=f"http://127.0.0.1:{port}").submit(job)


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
