"""The sbatch scripts SlurmBackend.plan renders: golden files, hostile values that must stay
inert, and the script's trap, requeue and stop machinery and `stop`'s fallbacks, with stand-ins
for Slurm.

Regenerate the golden files after an intended template change with
``SFTC_UPDATE_GOLDEN=1 pytest tests/unit/test_slurm_render.py``: a golden test whose file differs
rewrites it and fails, so that an update is never mistaken for a pass; review the diff, then rerun.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sft_cluster import storage
from sft_cluster.launch import LaunchError, Printed
from sft_cluster.launch.slurm import SlurmBackend, SlurmRequest, sbatch_quote
from sft_cluster.spec import CLUSTER_ADAPTER, load_job

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
HOSTILE = "a'b\"c $(touch /tmp/pwned) `touch /tmp/pwned` ; touch /tmp/pwned #"
# The submitter the golden files were rendered for: in /home/me/sft, its interpreter `python`.
WORKDIR = "/home/me/sft"
LAUNCHER_DIR = "/shared/runs/smoke/slurm"


def _job(*overrides: str):
    return load_job(REPO / "jobs" / "smoke.yaml", ["output_uri=/shared/runs/smoke", *overrides])


def _cluster(**fields):
    return CLUSTER_ADAPTER.validate_python({"kind": "slurm", **fields})


H100 = {
    "partition": "gpu",
    "account": "proj-1",
    "qos": "high",
    "gpus_per_node": 8,
    "cpus_per_task": 96,
    "mem": "0",
    "time": "2-00:00:00",
    "constraint": "h100&ib",
    "exclusive": True,
    "extra_sbatch": ["--mail-type=END,FAIL", "--comment=sft run"],
    "modules": ["cuda/12.4", "nccl"],
    "setup": "source /shared/venvs/sft/bin/activate",
    "container": {
        "kind": "pyxis",
        "image": "nvcr.io#nvidia/pytorch:25.01-py3",
        "mounts": ["/shared:/shared"],
    },
    "signal": "B:USR1@300",
    "max_requeues": 5,
}

CASES = {
    "ray-local": (_cluster(partition="debug", nodes=1, time="00:30:00"), ()),
    "torchrun-local": (_cluster(partition="debug", nodes=1, launcher="torchrun"), ()),
    "ray-h100": (
        _cluster(**H100),
        ("resources.num_workers=16", "resources.gpus_per_worker=1", "output_uri=s3://bucket/runs/qwen"),
    ),
    "torchrun-apptainer": (
        _cluster(
            **{**H100, "launcher": "torchrun", "container": {"kind": "apptainer", "image": "/shared/sft.sif"}}
        ),
        ("resources.num_workers=16", "resources.gpus_per_worker=1"),
    ),
}


@pytest.fixture
def plan(monkeypatch) -> Callable[[str], SlurmRequest]:
    """``plan(case)``: the request SlurmBackend plans for a case, as the golden submitter."""

    def make(name: str) -> SlurmRequest:
        cluster, overrides = CASES[name]
        job = _job(*overrides)
        backend = SlurmBackend(cluster, "c.yaml")
        with monkeypatch.context() as m:
            m.setattr(os, "getcwd", lambda: WORKDIR)
            m.setattr(sys, "executable", "python")
            if not storage.is_local(job.output_uri):  # else a folder named by the time (test_backends)
                m.setattr(backend, "folder", lambda job: Path(LAUNCHER_DIR))
            return backend.plan(job)

    return make


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden_file(plan, name: str) -> None:
    script = plan(name).script
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("SFTC_UPDATE_GOLDEN") and not (golden.exists() and golden.read_text() == script):
        golden.write_text(script)
        pytest.fail(f"SFTC_UPDATE_GOLDEN: rewrote {golden}; review the diff, then rerun without it")
    assert golden.exists(), f"missing {golden}: run with SFTC_UPDATE_GOLDEN=1 once and review it"
    assert script == golden.read_text(), f"{name}: rendered script differs from {golden}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_parses(plan, name: str) -> None:
    result = subprocess.run(["bash", "-n"], input=plan(name).script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cluster_fields_become_sbatch_lines(plan) -> None:
    script = plan("ray-h100").script
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in lines  # 16 workers / (8 GPUs a node / 1 GPU a worker)
    for expected in (
        "--partition=gpu",
        "--account=proj-1",
        "--qos=high",
        "--gpus-per-node=8",
        "--cpus-per-task=96",
        "--mem=0",
        "--time=2-00:00:00",
        '"--constraint=h100&ib"',
        "--exclusive",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        "--mail-type=END,FAIL",
        '"--comment=sft run"',
    ):
        assert f"#SBATCH {expected}" in lines, expected
    assert "module load cuda/12.4\nmodule load nccl\n" in script
    assert "\nsource /shared/venvs/sft/bin/activate\n" in script
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert "MAX_REQUEUES=5" in script


def test_torchrun_line(plan) -> None:
    script = plan("torchrun-apptainer").script
    assert '-m sft_cluster.driver "$JOB_YAML" --executor=torchrun' in script
    assert "#SBATCH --nodes=2\n" in script
    # The allocation's own node count: a requeue on fewer nodes (an elastic job) runs on what it got.
    assert '--nnodes="${#nodes[@]}" --nproc-per-node=8' in script
    assert '--rdzv-endpoint="$rdzv_endpoint"' in script
    assert "container_exec=(apptainer exec --pwd /home/me/sft /shared/sft.sif)" in script


def test_an_elastic_job_asks_slurm_for_a_range_of_nodes() -> None:
    """resources.num_workers {min: 8, max: 24} at 8 GPUs a node: 1 to 3 nodes, 8 processes each."""
    cluster = _cluster(**{**H100, "launcher": "torchrun"})
    job = _job(
        "resources.num_workers={min: 8, max: 24}", "resources.gpus_per_worker=1", "train.global_batch_size=48"
    )
    script = SlurmBackend(cluster, "c.yaml").plan(job).script
    assert "#SBATCH --nodes=1-3\n" in script and "--nproc-per-node=8" in script
    assert "#SBATCH --ntasks-per-node" not in script  # a task count would hold Slurm to the fewest nodes
    uneven = _job(
        "resources.num_workers={min: 4, max: 16}",
        "resources.gpus_per_worker=1",
        "train.global_batch_size=240",
    )
    with pytest.raises(LaunchError, match="an elastic run's min must be a multiple of it: 8"):
        SlurmBackend(cluster, "c.yaml").plan(uneven)


def _hostile_render(tmp_path: Path, monkeypatch) -> str:
    """Hostile cluster values, and a submitter whose folder and run directory have hostile names."""
    cluster = _cluster(
        partition="debug",
        constraint=HOSTILE,
        extra_sbatch=[f"--comment={HOSTILE}"],
        modules=[HOSTILE],
        container={"kind": "apptainer", "image": HOSTILE, "mounts": [HOSTILE]},
    )
    here = tmp_path / HOSTILE.replace("/", "_")
    here.mkdir()
    monkeypatch.chdir(here)
    job = load_job(REPO / "jobs" / "smoke.yaml", [f"output_uri={here / 'run'}"])
    return SlurmBackend(cluster, "c.yaml").plan(job).script


def _quoting(line: str) -> list[str]:
    """Bash's quoting of each character of ``line``: "'" or '"' inside such quotes, "" when bare."""
    states, state, escaped = [], "", False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\" and state != "'":
            escaped = True
        elif char in "'\"" and state in ("", char):
            state = "" if state == char else char
            states.append(char)  # the quote character itself
            continue
        states.append(state)
    return states


INJECTIONS = re.compile(r"\$\(touch|`touch|; touch")


def test_hostile_values_are_quoted(tmp_path: Path, monkeypatch) -> None:
    """Every injection is inside single quotes (shell lines) or sbatch's double quotes (#SBATCH)."""
    script = _hostile_render(tmp_path, monkeypatch)
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    checked = {"#SBATCH": 0, "shell": 0}
    for line in script.splitlines():
        sbatch = line.startswith("#SBATCH ")
        states = _quoting(line.removeprefix("#SBATCH ") if sbatch else line)
        offset = len("#SBATCH ") if sbatch else 0
        for match in INJECTIONS.finditer(line):
            quoted = states[match.start() - offset : match.end() - offset]
            assert set(quoted) == {'"' if sbatch else "'"}, line
            checked["#SBATCH" if sbatch else "shell"] += 1
    assert checked["#SBATCH"] >= 6 and checked["shell"] >= 6, checked  # constraint, comment; modules, ...


def test_hostile_values_run_inert(tmp_path: Path, monkeypatch) -> None:
    """Execute every assignment and `module load` line of the hostile script: nothing runs."""
    marker = tmp_path / "pwned"
    script = _hostile_render(tmp_path, monkeypatch).replace("/tmp/pwned", str(marker))
    lines = [
        line
        for line in script.splitlines()
        if re.match(r"(RUN_DIR|JOB_YAML|OUTPUT_URI|PYTHON|container_args|container_exec)=", line)
        or line.startswith("module load ")
    ]
    assert any("container_exec=(" in line for line in lines)
    probe = "\n".join(
        [
            "module() { printf 'module %s\\n' \"$*\"; }",
            *lines,
            'printf "%s\\n" "$OUTPUT_URI" "${container_exec[@]}"',
        ]
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "a hostile value executed"
    assert HOSTILE.replace("/tmp/pwned", str(marker)) in result.stdout  # the literal text came through


def test_sbatch_quote_follows_sbatch_parser() -> None:
    assert sbatch_quote("--time=01:00:00") == "--time=01:00:00"
    assert sbatch_quote('--comment=a "b" c\\d') == '"--comment=a \\"b\\" c\\\\d"'
    with pytest.raises(LaunchError):
        sbatch_quote("--comment=a\nb")


@pytest.mark.parametrize(
    ("cluster", "overrides", "message"),
    [
        ({"setup": "source a\nrm -rf /"}, (), "one shell line"),
        ({"signal": "B:USR2@60"}, (), "SIGUSR2"),
        ({"nodes": 2, "launcher": "torchrun"}, ("resources.num_workers=3",), "does not divide"),
    ],
)
def test_plan_refuses_a_script_that_cannot_run(cluster: dict, overrides: tuple, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        SlurmBackend(_cluster(**cluster), "c.yaml").plan(_job(*overrides))


def test_dry_run_is_the_script_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    job = load_job(REPO / "jobs" / "smoke.yaml", [f"output_uri={out}"])
    request = SlurmBackend(_cluster(partition="debug"), "c.yaml").plan(job)
    assert request.script.startswith("#!/bin/bash")
    assert f"#SBATCH --output={out}/slurm/slurm-%j.out" in request.script
    assert request.folder == out / "slurm" and request.script_path == out / "slurm" / "job.sbatch"
    script, strategy = request.dry_run()
    assert script == Printed(request.script, verbatim=True)  # on stdout, as it is: it can be piped
    assert strategy.stderr and strategy.text.startswith("# strategy.json")
    assert not out.exists()


def test_secrets_never_reach_the_script(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    monkeypatch.setenv("HF_TOKEN", "hf_sekrit_456")
    job = load_job(REPO / "jobs" / "smoke.yaml", [f"output_uri={tmp_path}/run"])
    request = SlurmBackend(_cluster(partition="debug"), "c.yaml").plan(job)
    assert not any("sekrit" in part.text for part in request.dry_run())
    assert "sekrit" not in request.job_yaml


def test_sbatch_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    job = load_job(REPO / "jobs" / "smoke.yaml", [f"output_uri={tmp_path}/run"])
    backend = SlurmBackend(_cluster(partition="debug"), "c.yaml")
    with pytest.raises(LaunchError, match="'sbatch' not found"):
        backend.launch(backend.plan(job))


CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
print("child ready", os.environ["SFT_CLUSTER_RUN_ID"], flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("restarts", "stop", "requeued"), [("0", False, True), ("3", False, False), ("0", True, False)]
)
def test_trap_forwards_the_signal_and_requeues_on_75(
    plan, tmp_path: Path, restarts: str, stop: bool, requeued: bool
) -> None:
    """The script's own machinery, with a stand-in for the training and for scontrol;
    ``stop``: the request ``sft-cluster stop`` leaves, which ends the job without a requeue."""
    import signal
    import time

    header = plan("torchrun-local").script.split("# --- torchrun")[0]
    header = header.replace("cd /home/me/sft", f"cd {tmp_path}")
    header = header.replace("RUN_DIR=/shared/runs/smoke/slurm", f"RUN_DIR={tmp_path}")
    script = tmp_path / "job.sh"
    script.write_text(f'{header}\nrun_child {sys.executable} -c "$CHILD"\nfinish\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (bin_dir / "scontrol").chmod(0o755)
    request = tmp_path / "stop-42"
    if stop:
        request.write_text("sft-cluster stop\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_RESTART_COUNT": restarts,
        "CHILD": CHILD,
    }
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "child ready" in line:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    log = "".join(lines) + out
    assert proc.returncode == 75, log
    assert "got SIGUSR1" in log
    assert "child ready slurm-42" in log  # the run id a requeued attempt shares
    assert requeued == (tmp_path / "scontrol.args").exists(), log
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]
        assert "requeue 1 of 3" in log
    elif stop:
        assert "stopped by sft-cluster stop, not requeued; resume with: sft-cluster resume " in log
        assert not request.exists()  # honoured once
    else:
        assert "max_requeues (3) is used up" in log


FAKE_SLURM = """#!/bin/bash
# squeue/scontrol/scancel/sacct stand-ins: the job's state lives in $STATE_FILE.
state=$(cat "$STATE_FILE")
case "$(basename "$0")" in
    squeue) [ "$state" = CANCELLED ] || echo "42|smoke|$state|2026-12-01T10:00:00|None" ;;
    scontrol) echo "JobId=42 JobName=smoke JobState=$state Command=$RUN_DIR/job.sbatch" ;;
    scancel)
        echo "$*" >> "$RUN_DIR/scancel.calls"
        if [ "$1" = --signal=USR1 ]; then
            echo "$AFTER_SIGNAL" > "$STATE_FILE"
        else
            echo CANCELLED > "$STATE_FILE"
        fi ;;
    sacct) exit 1 ;;
esac
"""


@pytest.mark.parametrize(
    ("after_signal", "why"),
    [
        ("PENDING", "it requeued itself although asked to stop (its script did not see"),
        ("RUNNING", "it was still RUNNING 0 s after the stop request"),
    ],
)
def test_stop_cancels_a_job_that_requeues_or_keeps_running(
    tmp_path: Path, monkeypatch, after_signal: str, why: str
) -> None:
    """``stop`` when the script does not end the job (an older script, an unshared run folder,
    a stuck training): it still ends, by ``scancel``, and says why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("squeue", "scontrol", "scancel", "sacct"):
        (bin_dir / name).write_text(FAKE_SLURM)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run" / "slurm"
    run_dir.mkdir(parents=True)
    (tmp_path / "state").write_text("RUNNING\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("STATE_FILE", str(tmp_path / "state"))
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    monkeypatch.setenv("AFTER_SIGNAL", after_signal)
    monkeypatch.setenv("SFT_CLUSTER_STATE_DIR", str(tmp_path / "registry"))
    backend = SlurmBackend(_cluster(partition="debug", signal="B:USR1@60"), "c.yaml")
    final = backend.stop("42", wait_seconds=0)
    assert final.state == "CANCELLED"
    assert final.message.startswith(f"{why}") and ": cancelled with scancel;" in final.message
    assert (run_dir / "scancel.calls").read_text().splitlines() == ["--signal=USR1 --batch 42", "42"]
    assert (run_dir / "stop-42").exists()  # the request the script would have honoured
