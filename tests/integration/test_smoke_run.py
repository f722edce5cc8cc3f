"""The smoke job end to end: real embedded Ray, 2 CPU workers, DDP over gloo.

Runs the CLI once (module fixture) and checks the outcome from several sides,
including which addresses the run's processes listened on while it ran.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLI, REPO, isolated_environment
from tests.fixtures.sockets import LOOPBACK, ListenerSampler

# torch's TCPStore, the rendezvous store rank 0 hosts at MASTER_ADDR:MASTER_PORT,
# listens on every interface whatever host it is given (torch has no bind
# address for it): the one listener allowed off loopback.
WILDCARD = ("::", "0.0.0.0")


@pytest.fixture(scope="module")
def smoke_watched(tmp_path_factory):
    """The smoke run, its process tree's sockets sampled while it runs (no second run for that)."""
    tmp = tmp_path_factory.mktemp("smoke")
    home = tmp / "home"
    # The full per-row fingerprints are opt-in (they grow with the run); this test compares them.
    env = {**isolated_environment(home), "SFT_CLUSTER_RECORD_ROWS": "1"}
    out = tmp / "run"
    args = [*CLI, "run", "jobs/smoke.yaml", f"output_uri={out}", "train.max_steps=120"]
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with ListenerSampler(proc.pid, interval=2.0) as sockets:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    return result, out, home, sockets


@pytest.fixture(scope="module")
def smoke_run(smoke_watched):
    result, out, home, _ = smoke_watched
    return result, out, home


def test_run_exits_zero_and_prints_summary(smoke_run):
    result, out, _ = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "completed" in result.stdout
    assert str(out) in result.stdout.replace("\n", "")
    assert "Traceback" not in result.stderr


def test_loss_fell_clearly(smoke_run):
    _, out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 120
    assert summary["restarts"] == 0
    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    for key in ("tokens_per_second", "wall_seconds", "time_to_first_step_seconds"):
        assert summary[key] > 0


def test_two_workers_really_trained_together(smoke_run):
    _, out, _ = smoke_run
    reports = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank-*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["world_size"] for r in reports} == {2}
    assert {r["distributed_type"] for r in reports} == {"MULTI_CPU"}
    assert {r["model_wrapper"] for r in reports} == {"DistributedDataParallel"}
    assert len({r["pid"] for r in reports}) == 2
    seen = [set(r["row_digests"]) for r in reports]
    assert all(len(s) > 50 for s in seen)
    assert not seen[0] & seen[1], "both ranks trained on the same rows"
    assert all(len(r["rows_digest"]) == 32 and r["rows_seen"] == len(r["row_digests"]) for r in reports)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_run_directory_layout(smoke_run):
    _, out, _ = smoke_run
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["train"]["max_steps"] == 120  # the override, resolved
    assert job["output_uri"] == str(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 121))
    for key in ("step", "loss", "learning_rate", "tokens", "tokens_per_second"):
        assert key in records[-1]
    assert records[-1]["tokens"] > records[0]["tokens"] > 0
    # Two CPU workers: the per-device rate is half the run's, and no MFU (no known peak on a CPU).
    last = records[-1]
    assert last["tokens_per_second_per_device"] == pytest.approx(last["tokens_per_second"] / 2)
    assert not any("mfu" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_second_per_device"] > 0 and "mfu" not in summary
    # Goodput: no restart, nothing lost; the evaluations and checkpoints took time; all adds up.
    split = summary["time_split"]
    assert split["restart_seconds"] == split["lost_seconds"] == 0
    assert min(split["evaluation_seconds"], split["checkpoint_seconds"], split["startup_seconds"]) > 0
    assert split["startup_seconds"] == pytest.approx(summary["time_to_first_step_seconds"], abs=1.0)
    assert abs(split["unaccounted_seconds"]) <= 0.02 * summary["wall_seconds"]
    assert 0 < summary["goodput"] < 1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_data_plan_packing_and_eval_loss(smoke_run):
    result, out, _ = smoke_run
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["seed"] == 42
    reports = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank-*.json"))]
    for report in reports:
        assert report["data"]["packing_efficiency"] >= 0.95
        assert report["data"]["wait_s"] > 0
        (source,) = report["data"]["sources"]
        assert source["samples"] > 400 and source["bad"] == 0
    # The smoke job holds out 5% (eval_every_n_steps: 50) and evaluates at the end too.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [50, 100, 120]
    # Every step's data wait (logging_steps 1), adding up to rank 0's whole wait for rows.
    assert all(r["data_wait_s"] >= 0 for r in records)
    assert sum(r["data_wait_s"] for r in records) == pytest.approx(reports[0]["data"]["wait_s"], abs=0.01)
    assert evals[120] < evals[50] < records[0]["loss"]
    assert "eval loss" in result.stdout
    # Each checkpoint holds every rank's data cursor.
    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    cursors = sorted(p.name for p in (step / "data-cursor").iterdir())
    assert cursors == ["rank-00000.json", "rank-00001.json"]
    cursor = json.loads((step / "data-cursor" / "rank-00001.json").read_text())
    assert cursor["rank"] == 1 and cursor["rows"] == 120 * 4


def test_final_model_loads_and_generates(smoke_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = smoke_run
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_embedded_ray_left_home_untouched(smoke_run):
    _, _, home = smoke_run
    assert not (Path(home) / ".ray" / "auth_token").exists()


def test_embedded_cluster_listens_on_loopback_only(smoke_watched):
    """Nothing of the private cluster is reachable from the network (issue #12)."""
    result, out, _, sockets = smoke_watched
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {x.process for x in sockets.listeners.values()}
    assert {"gcs_server", "raylet"} <= seen, f"{sockets.samples} samples saw only {seen}"
    reports = [json.loads(p.read_text()) for p in (out / "workers").glob("rank-*.json")]
    pids = {r["rank"]: r["pid"] for r in reports}
    # The store is the wildcard listener of rank 0 that rank 1 reached on loopback (MASTER_ADDR).
    rank1_peers = {
        c.remote[1] for c in sockets.connections.values() if c.pid == pids[1] and c.remote[0] in LOOPBACK
    }
    exposed = sockets.exposed()
    store = [
        x
        for x in exposed
        if x.pid == pids[0] and x.kind == "tcp" and x.ip in WILDCARD and x.port in rank1_peers
    ]
    unexpected = [str(x) for x in exposed if x not in store[:1]]
    assert not unexpected, "listening off loopback:\n" + "\n".join(unexpected)
    off = [str(c) for c in sockets.off_loopback()]
    assert not off, "connections off loopback:\n" + "\n".join(off)
