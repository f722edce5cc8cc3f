"""What a start may do to a run directory, and failures that must not lose work (issue #11).

Real runs under torchrun (2 CPU processes, gloo) and the CLI: a new run never mixes with an
earlier run's checkpoints, a completed run is not trained again, a resume after a change
the data cursors depend on is refused, one rank's upload failure reaches every rank, and
a restart with nothing to resume logs each step once and leaves no staging behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, TORCHRUN_DRIVER, isolated_environment, max_weight_diff, run_cli, run_torchrun

STEPS = 20
JOB = [
    f"train.max_steps={STEPS}",
    "checkpoint.every_n_steps=10",
    "checkpoint.keep_last=3",
    "train.eval_every_n_steps=10",
    "tracking=none",
]
SMOKE = REPO / "jobs" / "smoke.yaml"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its hash: what 'nothing changed' means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _staging_left(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.glob("sftc-stage-*"))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("safety")
    (tmp / "tmpdir").mkdir()
    # Staging folders go to TMPDIR: a private one shows what a run leaves behind.
    return {**isolated_environment(tmp / "home"), "TMPDIR": str(tmp / "tmpdir")}


@pytest.fixture(scope="module")
def completed(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("completed") / "run"
    result = run_torchrun(SMOKE, env, *JOB, f"output_uri={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _steps(out) == list(range(1, STEPS + 1))
    return out


def test_resume_never_refuses_an_earlier_runs_checkpoints_and_changes_nothing(env, completed):
    before = _snapshot(completed)
    for result in (
        run_cli(["run", str(SMOKE), *JOB, f"output_uri={completed}", "checkpoint.resume=never"], env),
        run_torchrun(SMOKE, env, *JOB, f"output_uri={completed}", "checkpoint.resume=never"),
    ):
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        text = result.stdout + result.stderr
        assert f"output_uri = {completed} holds committed checkpoints of an earlier run" in text
        assert "checkpoint.resume is 'never'" in text and "set output_uri to a new folder" in text
    assert "Traceback" not in result.stderr
    assert _snapshot(completed) == before  # nothing written, nothing pruned


def test_completed_run_is_not_trained_again(env, completed):
    before = _snapshot(completed)
    for result in (
        run_cli(["resume", str(completed)], env),
        run_torchrun(SMOKE, env, *JOB, f"output_uri={completed}"),
    ):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "already completed" in result.stdout + result.stderr
        assert f"step {STEPS} of train.max_steps {STEPS} is committed" in result.stdout + result.stderr
    assert _snapshot(completed) == before


def test_resume_at_the_last_step_without_final_trains_nothing_and_saves_final(env, completed, tmp_path):
    out = tmp_path / "no-final"
    shutil.copytree(completed, out)
    shutil.rmtree(out / "final")
    result = run_torchrun(SMOKE, env, *JOB, f"output_uri={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _steps(out) == list(range(1, STEPS + 1))  # no step 21
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["resumed_from"] == [STEPS]
    assert max_weight_diff(out, completed) == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.max_seq_len=128",
            "data.max_seq_len = 128, but the checkpoints up to step 20 were written with "
            "data.max_seq_len = 256",
        ),
        (
            "train.micro_batch_size=2",
            "the global batch is now 4 rows (train.micro_batch_size 2 x train.grad_accum_steps 1 x 2 "
            "workers), but the checkpoints up to step 20 were trained with 8",
        ),
        ("data.packing=false", "data.packing = False, but the checkpoints up to step 20"),
    ],
)
def test_resume_after_a_cursor_setting_changed_is_refused(env, completed, override, message):
    before = _snapshot(completed)
    result = run_cli(["resume", str(completed), "train.max_steps=30", override], env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert message in result.stderr and "to continue" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(completed) == before


def test_resume_after_the_chat_template_changed_is_refused(env, completed, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(REPO / "sft_cluster" / "assets" / "tiny-llama", tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_torchrun(
        SMOKE, env, *JOB, f"output_uri={completed}", "train.max_steps=30", f"model.tokenizer={tokenizer}"
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the tokenizer's chat template changed since step 20 was saved" in result.stderr


def test_upload_failure_on_one_rank_reaches_every_rank(env, tmp_path):
    out = tmp_path / "upload-fails"
    # Rank 1's cursor cannot land: a folder stands where the file must go (not a transient error).
    (out / "checkpoints" / "step-00000010" / "data-cursor" / "rank-00001.json").mkdir(parents=True)
    result = run_torchrun(SMOKE, env, *JOB, f"output_uri={out}")
    assert result.returncode not in (0, 2, 75), result.stdout[-3000:]
    text = result.stdout + result.stderr
    failure = "uploading checkpoint step 10 failed (rank 1: IsADirectoryError"
    # Both ranks raise the same error from the same collective: rank 0 does not wait for a share.
    assert sum(failure in line for line in text.splitlines() if "RuntimeError" in line) >= 2, text[-4000:]
    assert not (out / "checkpoints" / "step-00000010" / "COMMITTED").exists()
    assert _staging_left(Path(env["TMPDIR"])) == []


def test_restart_with_nothing_to_resume_logs_each_step_once_and_sweeps_staging(env, tmp_path):
    out = tmp_path / "killed-early"
    job = [*JOB, "checkpoint.every_n_steps=15", f"output_uri={out}"]
    proc = subprocess.Popen(
        [*TORCHRUN_DRIVER, str(SMOKE), *job, "--nproc-per-node=2"],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(_steps(out)) < 5:
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 5"
        time.sleep(0.2)
    assert not (out / "checkpoints" / "step-00000015" / "COMMITTED").exists()
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)  # every worker dies without cleaning up
    proc.kill()
    proc.wait()
    assert _staging_left(Path(env["TMPDIR"])), "the killed workers left their staging folders"
    result = run_torchrun(SMOKE, env, *job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _steps(out) == list(range(1, STEPS + 1))  # each step once, not 1..k then 1..20
    summary = json.loads((out / "summary.json").read_text())
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["first_loss"] == first["loss"] and summary["resumed_from"] == []
    assert _staging_left(Path(env["TMPDIR"])) == []  # the dead attempt's folders were swept
