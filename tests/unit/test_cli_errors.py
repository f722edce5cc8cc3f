"""What a user sees for a bad job file: one clear line per problem, exit 2, no traceback.

These run the real CLI in a subprocess; none of them may start Ray (they
would take seconds, not the ~1 s they take).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

VALID = """\
name: t
model: {name_or_path: builtin:tiny-llama, from_config: true}
data: {sources: [{uri: builtin:smoke-chat.jsonl}]}
train: {max_steps: 10}
"""


def _job(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def _expect_error(result, *lines: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "starting a local Ray cluster" not in result.stdout
    for line in lines:
        assert line in result.stderr, result.stderr


def test_valid_job_passes(tmp_path, isolated_env):
    result = run_cli(["validate", _job(tmp_path, VALID)], isolated_env)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_validate_check_data_lists_the_sources(isolated_env):
    """--check-data also reads every source (it once crashed: the option shadowed the check)."""
    result = run_cli(["validate", "jobs/smoke.yaml", "--check-data"], isolated_env)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    missing = run_cli(
        ["validate", "jobs/smoke.yaml", "--check-data", "data.sources[0].uri=/nope.jsonl"], isolated_env
    )
    assert missing.returncode == 2 and "/nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_every_shipped_job_and_cluster_file_validates(isolated_env):
    repo = Path(__file__).resolve().parents[2]
    jobs = sorted((repo / "jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        result = run_cli(["validate", str(job), "--cluster", "cluster_configs/local.yaml"], isolated_env)
        assert result.returncode == 0, f"{job}: {result.stderr}"


def test_missing_file(isolated_env):
    result = run_cli(["run", "jobs/nope.yaml"], isolated_env)
    _expect_error(result, "error: jobs/nope.yaml: file not found")


def test_yaml_syntax_error_has_line_and_column(tmp_path, isolated_env):
    path = _job(tmp_path, "name: t\ntrain: {max_steps: 10\nmodel: x\n")
    result = run_cli(["run", path], isolated_env)
    _expect_error(result, f"error: {path}:", "YAML syntax error")
    assert f"{path}:3:" in result.stderr or f"{path}:2:" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("trian: {}", "unknown key 'trian' (did you mean 'train'?)"),
        ("train: {max_steps: -5}", "train.max_steps = -5: must be a positive integer"),
        ("train: {max_steps: abc}", "train.max_steps = 'abc': expected an integer"),
        ("train: {max_steps: 10, learning_rate: -0.1}", "train.learning_rate = -0.1: must be greater than 0"),
        ("train: {max_steps: 10, lr: 0.1}", "unknown key 'train.lr' (valid keys:"),
        ("resources: {num_workers: 0}", "resources.num_workers = 0: must be a positive integer"),
        ("strategy: {kind: fsdpp}", "strategy.kind = 'fsdpp': must be one of 'ddp', 'fsdp', 'deepspeed'"),
        ("storage: {options: {secret: hunter2}}", "storage.options: 'secret' is a credential"),
    ],
)
def test_bad_values_name_field_value_and_fix(tmp_path, isolated_env, edit, message):
    key = edit.split(":")[0]
    kept = [line for line in VALID.splitlines() if not line.startswith(f"{key}:")]
    path = _job(tmp_path, "\n".join([*kept, edit]) + "\n")
    result = run_cli(["run", path], isolated_env)
    _expect_error(result, f"error: {path}: {message}")
    assert "hunter2" not in result.stderr


def test_all_problems_reported_at_once(tmp_path, isolated_env):
    path = _job(tmp_path, VALID.replace("max_steps: 10", "max_steps: 0, seed: -1") + "trian: 1\n")
    result = run_cli(["validate", path], isolated_env)
    _expect_error(result, "train.max_steps = 0", "train.seed = -1", "unknown key 'trian'")
    assert result.stderr.count("error:") == 3


def test_missing_model_and_data_paths(tmp_path, isolated_env):
    text = VALID.replace("builtin:tiny-llama", "./no-such-model").replace(
        "builtin:smoke-chat.jsonl", str(tmp_path / "missing.jsonl")
    )
    path = _job(tmp_path, text)
    _expect_error(
        run_cli(["run", path], isolated_env),
        "model.name_or_path = './no-such-model': no such directory",
        "data.sources[0].uri = ",
        "missing.jsonl': no such file or directory (check the path",
    )


def test_overrides_apply_and_unknown_override_suggests(tmp_path, isolated_env):
    path = _job(tmp_path, VALID)
    ok = run_cli(["run", path, "train.max_steps=7", "output_uri=/tmp/x", "--dry-run"], isolated_env)
    assert ok.returncode == 0, ok.stderr
    assert "max_steps: 7" in ok.stdout and "output_uri: /tmp/x" in ok.stdout
    bad = run_cli(["run", path, "train.max_stepz=40"], isolated_env)
    _expect_error(
        bad, "override 'train.max_stepz=40': unknown key 'train.max_stepz' (did you mean 'train.max_steps'?)"
    )
    malformed = run_cli(["run", path, "train.max_steps"], isolated_env)
    _expect_error(malformed, "override 'train.max_steps': expected KEY=VALUE")


def test_run_refuses_a_remote_cluster_file(tmp_path, isolated_env):
    cluster = tmp_path / "ray.yaml"
    cluster.write_text("kind: ray\naddress: http://127.0.0.1:8265\n")
    result = run_cli(["run", _job(tmp_path, VALID), "--cluster", str(cluster)], isolated_env)
    _expect_error(result, "'run' needs a cluster of kind 'local'")


def test_strategy_combinations_that_cannot_run_are_rejected_with_the_reason(tmp_path, isolated_env):
    bad = "strategy: {kind: fsdp, precision: fp16, fsdp: {version: 1, cpu_offload: true}, lora: {r: 8}, "
    bad += "liger: true}\n"
    result = run_cli(["validate", _job(tmp_path, VALID + bad)], isolated_env)
    _expect_error(
        result,
        "strategy.precision = 'fp16' with resources.gpus_per_worker = 0: fp16 loss scaling needs a GPU",
        "strategy.fsdp.version = 1 with resources.gpus_per_worker = 0: FSDP1 does not run on CPU",
        "strategy.fsdp.cpu_offload = true with resources.gpus_per_worker = 0",
        "strategy.liger = true with resources.gpus_per_worker = 0: Liger's kernels are Triton kernels "
        "that need a CUDA GPU (remove strategy.liger, or give the workers GPUs)",
        "strategy.lora.merge = false with model.from_config = true",
    )
    zero3_offload = (
        "strategy: {kind: deepspeed, deepspeed: {stage: 3, offload_params: true}, lora: {merge: true}}\n"
    )
    _expect_error(
        run_cli(["validate", _job(tmp_path, VALID + zero3_offload)], isolated_env),
        "peft adapters are not supported with ZeRO-3 parameter offload",
    )
    stage2_offload = "strategy: {kind: deepspeed, deepspeed: {stage: 2, offload_params: true}}\n"
    _expect_error(
        run_cli(["validate", _job(tmp_path, VALID + stage2_offload)], isolated_env),
        "strategy.deepspeed.offload_params: true requires strategy.deepspeed.stage: 3",
    )


def test_resume_names_a_missing_run_and_a_bad_cluster_file(tmp_path, isolated_env):
    _expect_error(run_cli(["resume", str(tmp_path / "nope")], isolated_env), "no job.yaml here")
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.yaml").write_text(VALID)
    cluster = tmp_path / "c.yaml"
    cluster.write_text("kind: slurm\ntime: forever\n")
    _expect_error(run_cli(["resume", str(run), "--cluster", str(cluster)], isolated_env), "time = 'forever'")


@pytest.mark.parametrize("args", [["status", "x"], ["logs", "x"], ["logs", "x", "--follow"], ["list"]])
def test_job_id_commands_refuse_a_local_cluster(isolated_env, args):
    result = run_cli([*args, "--cluster", "cluster_configs/local.yaml"], isolated_env)
    _expect_error(
        result, "error: cluster_configs/local.yaml: local runs have no job ids; look in the run directory"
    )


def test_sbatch_dry_run_prints_only_the_script_on_stdout(tmp_path, isolated_env):
    """So that `sbatch --dry-run > job.sbatch` is the script: the strategy section goes to stderr."""
    cluster = tmp_path / "slurm.yaml"
    cluster.write_text("kind: slurm\npartition: debug\n")
    result = run_cli(
        [
            "sbatch",
            _job(tmp_path, VALID),
            f"output_uri={tmp_path}/run",
            "--cluster",
            str(cluster),
            "--dry-run",
        ],
        isolated_env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash\n") and "strategy.json (generated" not in result.stdout
    assert result.stderr.startswith("# strategy.json (generated from the job's strategy section)\n{")
    assert not (tmp_path / "run").exists()
