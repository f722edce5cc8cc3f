"""Ray Jobs against a real head (``ray start --head``, 2 CPUs): submit, watch, stop, fail, auth.

Every command runs the real CLI in a subprocess, as a user would. Tests run in
file order: one training job at a time on the shared 2-CPU head. The main job
reads its data from and writes its run to the real S3 server (SeaweedFS), with
the credentials passed only through ``runtime_env.pass_env``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.fixtures.ray_head import RAY, RayHead, free_ports, ray_head, ray_token_head  # noqa: F401
from tests.fixtures.s3 import s3_server  # noqa: F401

SMOKE = ["jobs/smoke.yaml", "train.max_steps=20", "resources.num_workers=2", "checkpoint.every_n_steps=10"]


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    return result.stdout


def _user_error(result, *needles: str) -> str:
    """Exit 2, one clear 'error:' line, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-4000:]
    assert "Traceback" not in text
    assert result.stderr.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def _submitted_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split()[1]


def _env(head: RayHead, tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(head.env)
    env["SFT_CLUSTER_STATE_DIR"] = str(tmp / "state")
    env.update(extra)
    return env


def _wait_state(job_id: str, cluster: Path, env: dict, states: set[str], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        result = run_cli(["status", job_id, "--cluster", str(cluster)], env)
        state = result.stdout.split()[1] if result.returncode == 0 and result.stdout.split() else "?"
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s, wanted {states}")


@pytest.fixture(scope="module")
def work(tmp_path_factory, ray_head: RayHead):  # noqa: F811
    tmp = tmp_path_factory.mktemp("rayjobs")
    cluster = ray_head.cluster_file(tmp / "ray.yaml", runtime_env={"pass_env": ["AWS_*"]})
    return tmp, cluster, _env(ray_head, tmp)


@pytest.fixture(scope="module")
def s3_run(work, s3_server):  # noqa: F811
    """Data and output on the real S3 server; credentials reach the job only through pass_env."""
    _, cluster, env = work
    bucket = s3_server.make_bucket()
    s3_server.client().upload_file(
        str(REPO / "sft_cluster/assets/smoke-chat.jsonl"), bucket, "data/chat.jsonl"
    )
    args = [
        "submit",
        "jobs/smoke.yaml",
        "resources.num_workers=2",
        f"output_uri=s3://{bucket}/runs/smoke",
        f"storage.endpoint_url={s3_server.endpoint}",
        f"data.sources=[{{uri: 's3://{bucket}/data/chat.jsonl'}}]",
        "checkpoint.every_n_steps=10",
        "tracking=none",
        "--cluster",
        str(cluster),
        "--follow",
    ]
    return args, {**env, **s3_server.env()}, bucket


@pytest.fixture(scope="module")
def smoke(s3_run):
    args, env, bucket = s3_run
    return run_cli([*args, "train.max_steps=10"], env), bucket


def _s3_text(s3_server, bucket: str, key: str, run: str = "smoke") -> str:  # noqa: F811
    return s3_server.client().get_object(Bucket=bucket, Key=f"runs/{run}/{key}")["Body"].read().decode()


def test_dry_run_prints_request_and_submits_nothing(work, ray_head: RayHead):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    tmp, cluster, env = work
    before = len(JobSubmissionClient(ray_head.address).list_jobs())
    secret = "s3cr3t-value-never-printed"
    env = {**env, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": "http://u:pw@127.0.0.1:9"}
    result = run_cli(
        ["submit", *SMOKE, f"output_uri={tmp / 'dry'}", "--cluster", str(cluster), "--dry-run"], env
    )
    text = _ok(result)
    assert "python -m sft_cluster.driver --job-env SFT_CLUSTER_JOB_YAML" in text
    request = json.loads(text[text.index("{") : text.index("\n}\n") + 2])
    runtime_env = request["runtime_env"]
    assert runtime_env["working_dir"] == str(REPO)
    assert ".venv" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"].startswith("<redacted")
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"].startswith("<redacted")
    assert request["metadata"]["output_uri"] == str(tmp / "dry")
    assert request["entrypoint_num_cpus"] == 0
    assert "max_steps: 20" in text  # the resolved job
    assert secret not in result.stdout + result.stderr
    assert "pw@" not in result.stdout + result.stderr
    assert len(JobSubmissionClient(ray_head.address).list_jobs()) == before
    assert not (tmp / "dry").exists()


def test_doctor_checks_the_cluster_with_a_probe_job(work, ray_head: RayHead):  # noqa: F811
    """Versions and staging space come from a probe that ran on the cluster as a Ray Job; the
    resources from the head's node list (2 CPUs: 2 workers fit, 4 do not)."""
    from ray.job_submission import JobSubmissionClient

    _, cluster, env = work
    result = run_cli(["doctor", *SMOKE, "--cluster", str(cluster)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}
    assert list(lines) == ["job", "cluster", "resources", "versions", "staging", "stacks", "output", "data"]
    assert "Ray 2." in lines["cluster"] and "1 nodes alive" in lines["cluster"]
    assert "on a Ray node: no Yama; py-spy may read" in lines["stacks"]
    assert "2 CPUs" in lines["resources"]
    assert "on a Ray node: ray 2." in lines["versions"] and "torch 2." in lines["versions"]
    assert "a path on the cluster, checked when it starts" in lines["output"]
    probes = [
        j
        for j in JobSubmissionClient(ray_head.address).list_jobs()
        if j.submission_id.startswith("sftc-doctor-")
    ]
    assert [j.status.value for j in probes] == ["SUCCEEDED"]
    too_many = run_cli(["doctor", *SMOKE, "resources.num_workers=4", "--cluster", str(cluster)], env)
    assert too_many.returncode == 2
    assert "FAIL resources  2 CPUs, 0 GPUs; the job needs 4 CPUs" in too_many.stdout


def test_submit_follow_succeeds(smoke, s3_server):  # noqa: F811
    result, bucket = smoke
    text = _ok(result)
    assert f"output_uri: s3://{bucket}/runs/smoke" in text.replace("\n", "")
    assert "step 10/10" in text
    assert "SUCCEEDED" in text
    assert s3_server.secret_key not in result.stdout + result.stderr


def test_run_directory_on_the_cluster(smoke, s3_server):  # noqa: F811
    _, bucket = smoke
    summary = json.loads(_s3_text(s3_server, bucket, "summary.json"))
    assert summary["status"] == "completed"
    assert summary["steps"] == 10
    assert summary["world_size"] == 2
    keys = s3_server.keys(bucket, "runs/smoke/final/")
    assert "runs/smoke/final/model.safetensors" in keys
    job_yaml = _s3_text(s3_server, bucket, "job.yaml")
    assert "max_steps: 10" in job_yaml
    assert s3_server.secret_key not in job_yaml


def test_status_ours_and_rays(smoke, work, ray_head: RayHead):  # noqa: F811
    result, _ = smoke
    _, cluster, env = work
    job_id = _submitted_id(result.stdout)
    # By id alone: the local registry knows where it runs.
    assert _ok(run_cli(["status", job_id], env)).split()[:2] == [job_id, "SUCCEEDED"]
    ray_status = subprocess.run(
        [RAY, "job", "status", "--address", ray_head.address, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ray_status.returncode == 0, ray_status.stderr
    assert "succeeded" in (ray_status.stdout + ray_status.stderr).lower()
    listing = _ok(run_cli(["list", "--cluster", str(cluster)], {**env, "COLUMNS": "250"}))
    row = next(line for line in listing.splitlines() if job_id in line)
    assert "smoke" in row and "SUCCEEDED" in row
    assert "step 10/10" in _ok(run_cli(["logs", job_id], env))


def test_unknown_job_id(work):
    _, cluster, env = work
    for verb in ("status", "logs", "stop"):
        _user_error(
            run_cli([verb, "raysubmit_nope", "--cluster", str(cluster)], env), "no job 'raysubmit_nope'"
        )


def test_unreachable_address(work, tmp_path):
    _, _, env = work
    (port,) = free_ports(1)
    cluster = tmp_path / "gone.yaml"
    cluster.write_text(f"kind: ray\naddress: http://127.0.0.1:{port}\n")
    checked = run_cli(["submit", *SMOKE, "--cluster", str(cluster)], env)
    checked = _user_error(checked, "cannot reach", str(port))
    assert "nothing was submitted ('sft-cluster doctor' runs every check)" in checked
    # Without the checks the submission itself finds the same.
    unchecked = run_cli(["submit", *SMOKE, "--no-checks", "--cluster", str(cluster)], env)
    assert "nothing was submitted" not in _user_error(unchecked, "cannot reach", str(port))
    _user_error(run_cli(["list", "--cluster", str(cluster)], env), "cannot reach")


def test_failing_job_is_failed_with_its_error(work):
    tmp, cluster, env = work
    # Valid here, unwritable on the cluster: only the driver finds out.
    bad = "/proc/sftc-not-writable/run"
    result = run_cli(["submit", *SMOKE, f"output_uri={bad}", "--cluster", str(cluster), "--follow"], env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED" in result.stdout
    assert "exit code 1" in result.stderr  # the outcome, with the last log lines
    job_id = _submitted_id(result.stdout)
    status = run_cli(["status", job_id, "--cluster", str(cluster)], env)
    assert status.stdout.split()[1] == "FAILED"
    assert "exit code 1" in status.stdout
    logs = _ok(run_cli(["logs", job_id], env))
    assert "sftc-not-writable" in logs and ("Error" in logs or "error" in logs)


def test_resubmit_resumes_from_the_newest_checkpoint(smoke, s3_run, s3_server):  # noqa: F811
    _, bucket = smoke
    args, env, _ = s3_run
    assert "SUCCEEDED" in _ok(run_cli([*args, "train.max_steps=20"], env))
    summary = json.loads(_s3_text(s3_server, bucket, "summary.json"))
    assert summary["resumed_from"] == [10] and summary["steps"] == 20


def _wait_log(head: RayHead, job_id: str, needle: str, timeout: float = 300) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address)
    deadline = time.monotonic() + timeout
    while needle not in (logs := client.get_job_logs(job_id)):
        assert time.monotonic() < deadline, f"no '{needle}' in the log of {job_id}:\n{logs[-3000:]}"
        assert not client.get_job_info(job_id).status.is_terminal(), logs[-3000:]
        time.sleep(2)


def test_resubmitting_a_finished_run(smoke, s3_run, s3_server):  # noqa: F811
    """Completed: nothing is trained, exit 0. A new run over its commits (resume: never): exit 2."""
    _, bucket = smoke
    args, env, _ = s3_run
    before = {
        k: s3_server.client().head_object(Bucket=bucket, Key=k)["ETag"]
        for k in s3_server.keys(bucket, "runs/smoke/")
    }
    done = run_cli([*args, "train.max_steps=20"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "already completed: step 20 of train.max_steps 20 is committed" in done.stdout
    refused = run_cli([*args, "train.max_steps=20", "checkpoint.resume=never"], env)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "holds committed checkpoints of an earlier run" in refused.stdout
    after = {
        k: s3_server.client().head_object(Bucket=bucket, Key=k)["ETag"]
        for k in s3_server.keys(bucket, "runs/smoke/")
    }
    assert after == before  # neither start wrote or deleted anything in the run directory


def test_stop_a_running_job(work, s3_server, ray_head: RayHead):  # noqa: F811
    """``stop``: the run checkpoints, commits and ends (PREEMPTED, resumable); ``stop --now``
    ends another at once. The first writes to S3, and the stop request reaches it there
    through the endpoint in the job's own YAML (not $AWS_ENDPOINT_URL)."""
    tmp, cluster, env = work
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/runs/stopped"
    s3_env = {**env, **s3_server.env()}
    base = ["submit", "jobs/smoke.yaml", "train.max_steps=5000", "checkpoint.every_n_steps=1000",
            "tracking=none", "--cluster", str(cluster)]  # fmt: skip
    on_s3 = [f"output_uri={uri}", f"storage.endpoint_url={s3_server.endpoint}"]
    graceful = _submitted_id(_ok(run_cli([*base, *on_s3], s3_env)))
    at_once = _submitted_id(_ok(run_cli([*base, f"output_uri={tmp / 'stopped-now'}"], env)))

    _wait_state(at_once, cluster, env, {"RUNNING"}, timeout=120)
    now = _ok(run_cli(["stop", at_once, "--now"], env, timeout=90))  # returns: SIGTERM, SIGKILL 3 s later
    assert f"job {at_once}: STOPPED" in now
    _user_error(run_cli(["stop", at_once], env), "already STOPPED: nothing to stop")

    _wait_log(ray_head, graceful, "/5000  loss")  # trains
    stop_env = {k: v for k, v in s3_env.items() if k != "AWS_ENDPOINT_URL"}
    text = _ok(run_cli(["stop", graceful], stop_env, timeout=400))
    assert "stop requested" in text
    outcome = rf"job {graceful}: PREEMPTED  checkpointed at step (\d+); resume with: sft-cluster resume "
    found = re.search(outcome + re.escape(f"{uri} --cluster {cluster}"), text)
    assert found, text
    step = int(found.group(1))
    assert 1 <= step < 1000  # committed because of the stop, not by every_n_steps
    assert f"runs/stopped/checkpoints/step-{step:08d}/COMMITTED" in s3_server.keys(bucket, "runs/stopped/")
    summary = json.loads(_s3_text(s3_server, bucket, "summary.json", run="stopped"))
    assert summary["status"] == "preempted" and summary["steps"] == step
    status = _ok(run_cli(["status", graceful], stop_env))
    assert status.split()[1] == "PREEMPTED" and f"step {step}" in status
    _user_error(run_cli(["stop", graceful], stop_env), "already PREEMPTED: nothing to stop")


class TestTokenAuth:
    """A head started with RAY_AUTH_MODE=token."""

    def _cluster(self, head: RayHead, tmp: Path, **auth: str) -> Path:
        return head.cluster_file(tmp / f"token-{len(list(tmp.iterdir()))}.yaml", auth=auth)

    def test_refused_without_the_token(self, ray_token_head: RayHead, tmp_path):  # noqa: F811
        env = _env(ray_token_head, tmp_path)
        no_auth = self._cluster(ray_token_head, tmp_path)
        _user_error(run_cli(["list", "--cluster", str(no_auth)], env), "requires a token")
        _user_error(run_cli(["submit", *SMOKE, "--cluster", str(no_auth)], env), "requires a token")
        doctor = run_cli(["doctor", *SMOKE, "--cluster", str(no_auth)], env)
        assert (
            doctor.returncode == 2 and "FAIL cluster" in doctor.stdout and "requires a token" in doctor.stdout
        )
        with_auth = self._cluster(ray_token_head, tmp_path, mode="token")
        _user_error(run_cli(["list", "--cluster", str(with_auth)], env), "$RAY_AUTH_TOKEN is not set")
        wrong = {**env, "RAY_AUTH_TOKEN": "0" * 32}
        _user_error(run_cli(["list", "--cluster", str(with_auth)], wrong), "rejected the token")

    def test_accepted_with_the_token(self, ray_token_head: RayHead, tmp_path):  # noqa: F811
        from ray.job_submission import JobSubmissionClient

        token = ray_token_head.token
        env = _env(ray_token_head, tmp_path, SFTC_TEST_TOKEN=token)
        cluster = self._cluster(ray_token_head, tmp_path, mode="token", token_env="SFTC_TEST_TOKEN")
        out = tmp_path / "run"
        args = ["submit", "jobs/smoke.yaml", "train.max_steps=2", f"output_uri={out}", "--follow"]
        result = run_cli([*args, "--cluster", str(cluster)], env)
        _ok(result)
        assert "SUCCEEDED" in result.stdout
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"  # a local path
        assert token not in result.stdout + result.stderr
        job_id = _submitted_id(result.stdout)
        info = JobSubmissionClient(ray_token_head.address, headers=ray_token_head.headers()).get_job_info(
            job_id
        )
        assert token not in json.dumps(info.runtime_env) + json.dumps(info.metadata or {})
        for path in [*out.rglob("*.json"), *out.rglob("*.yaml"), *(tmp_path / "state").rglob("*")]:
            if path.is_file():
                assert token not in path.read_text(errors="replace"), path
        # From a token file as well.
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        from_file = self._cluster(ray_token_head, tmp_path, mode="token", token_file=str(token_file))
        assert job_id in _ok(run_cli(["list", "--cluster", str(from_file)], {**env, "COLUMNS": "250"}))
