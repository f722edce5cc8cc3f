"""``sft-cluster doctor`` on this machine (the local cluster kind) with output on the real S3 server
(SeaweedFS): a good setup passes every check; each broken input fails its own check with the fix,
exit 2, no traceback, and nothing left behind. The Ray and Slurm checks are in test_ray_jobs.py
and test_slurm.py, beside the real head and the real slurmctld."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.fixtures.s3 import s3_server  # noqa: F401


def _lines(result) -> dict[str, str]:
    """Each check's line, by name: ``ok   output     ...`` -> {"output": "ok   output ..."}."""
    return {line.split()[1]: line for line in result.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}


def test_a_good_local_setup_passes_every_check(s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.make_bucket()
    env = {**s3_server.env(), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = run_cli(
        [
            "doctor",
            "jobs/smoke.yaml",
            f"output_uri=s3://{bucket}/run",
            f"storage.endpoint_url={s3_server.endpoint}",
        ],
        env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result)
    assert list(lines) == ["job", "cluster", "resources", "staging", "stacks", "output", "data"]
    assert all(line.startswith("ok") for line in lines.values()), result.stdout
    assert "here: no Yama; py-spy may read the workers' stacks" in lines["stacks"]  # this machine
    assert "written, read back and removed" in lines["output"]
    assert "train tokens" in lines["data"]
    assert "every check passed" in result.stdout
    # The probe object is gone: the bucket is as empty as it was.
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_each_broken_input_fails_its_check_with_the_fix(s3_server, tmp_path):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bucket = s3_server.make_bucket()
    env = {**s3_server.env(), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = run_cli(
        [
            "doctor",
            "jobs/smoke.yaml",
            f"output_uri={blocker}/run",
            f"data.sources=[{{uri: 's3://{bucket}/missing.jsonl'}}]",
            f"storage.endpoint_url={s3_server.endpoint}",
            "resources.num_workers=64",
        ],
        env,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = _lines(result)
    assert lines["resources"].startswith("FAIL") and "needs 64 CPUs" in lines["resources"]
    assert lines["output"].startswith("FAIL") and "is not a folder this user can write to" in lines["output"]
    assert lines["data"].startswith("FAIL") and "missing.jsonl" in lines["data"]
    assert result.stdout.count("fix: ") == 3
    assert "3 check(s) failed" in result.stderr
    assert not blocker.with_name("run").exists()

    wrong_key = run_cli(
        [
            "doctor",
            "jobs/smoke.yaml",
            f"output_uri=s3://{bucket}/run",
            f"storage.endpoint_url={s3_server.endpoint}",
        ],
        {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    )
    assert wrong_key.returncode == 2
    output = _lines(wrong_key)["output"]
    assert output.startswith("FAIL") and f"s3://{bucket}/run" in output
    assert "not-the-secret" not in wrong_key.stdout + wrong_key.stderr
