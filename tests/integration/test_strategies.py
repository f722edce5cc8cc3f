"""DDP, DeepSpeed ZeRO-3 and FSDP2 (ZeRO-2 opt-in) on 2 CPU workers over gloo, for real.

Each strategy trains the smoke job through `sft-cluster run` (embedded Ray
Train). The tests check that the topology really was distributed and sharded,
that all give DDP's losses, that each resumes exactly from its own (sharded)
checkpoint under plain torchrun, and that `final/` is whole. The same
strategies on real model families are in test_families.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, isolated_environment, run_cli, run_torchrun

STEPS = 20
COMMON = [
    "jobs/smoke.yaml",
    f"train.max_steps={STEPS}",
    "checkpoint.every_n_steps=10",
    "checkpoint.keep_last=2",
    "tracking=none",
]
STRATEGIES = {
    "ddp": ["strategy.kind=ddp"],
    # Threshold 0: on a model this small ZeRO-3 would otherwise keep every parameter whole.
    "zero3": [
        "strategy.kind=deepspeed",
        "strategy.deepspeed.stage=3",
        "strategy.deepspeed.param_persistence_threshold=0",
    ],
    "fsdp2": ["strategy.kind=fsdp", "strategy.fsdp.version=2"],
}
# ZeRO-2 saves and restores as ZeRO-3 does (per-rank optimizer shards): opt-in, to keep CI short.
ZERO2 = ["strategy.kind=deepspeed", "strategy.deepspeed.stage=2"]
EXPECTED = {  # distributed type, wrapper class, share of the parameters each rank holds
    "ddp": ("MULTI_CPU", "DistributedDataParallel", 1.0),
    "zero3": ("DEEPSPEED", "DeepSpeedEngine", 0.5),
    "fsdp2": ("FSDP", "FSDPLlamaForCausalLM", 0.5),
}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """The final model as plain transformers loads it (tied weights resolved the same way)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, Path], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("strategies")
    env = isolated_environment(tmp / "home")
    outs = {}
    for name, overrides in STRATEGIES.items():
        out = tmp / name
        result = run_cli(["run", *COMMON, *overrides, f"output_uri={out}"], env)
        assert result.returncode == 0, f"{name}: " + result.stdout[-3000:] + result.stderr[-3000:]
        outs[name] = out
    return outs, env


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_topology_is_really_distributed_and_sharded(runs, name):
    outs, _ = runs
    distributed_type, wrapper, share = EXPECTED[name]
    reports = [json.loads(p.read_text()) for p in sorted((outs[name] / "workers").glob("rank-*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["world_size"] == 2
        assert report["distributed_type"] == distributed_type
        assert report["model_wrapper"] == wrapper
        assert report["parameter_share"] == pytest.approx(share, abs=0.05)
    assert reports[0]["pid"] != reports[1]["pid"]
    recorded = json.loads((outs[name] / "strategy.json").read_text())
    assert recorded["world_size"] == 2
    if name.startswith("zero"):
        ds = recorded["deepspeed"]
        assert ds["train_batch_size"] == 4 * 1 * 2  # micro x grad_accum x world
        assert ds["zero_optimization"]["stage"] == int(name[-1])
    if name == "fsdp2":
        assert recorded["accelerate"]["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_all_strategies_give_ddps_losses_and_weights(runs):
    outs, _ = runs
    reference = _losses(outs["ddp"])
    assert len(reference) == STEPS and reference[-1] < reference[0] - 1.0
    reference_weights = _final_state(outs["ddp"])
    for name in ("zero3", "fsdp2"):
        losses = _losses(outs[name])
        assert len(losses) == STEPS
        assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-5, name
        # final/ is consolidated: whole tensors that plain transformers loads.
        assert _max_diff(_final_state(outs[name]), reference_weights) <= 1e-5, name


@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_sharded_checkpoint_resumes_exactly_under_torchrun(runs, name, tmp_path):
    outs, env = runs
    out = tmp_path / name
    shutil.copytree(outs[name], out)
    step10 = out / "checkpoints" / "step-00000010"
    files = json.loads((step10 / "manifest.json").read_text())["files"]
    if name == "zero3":  # each rank's partition is in the checkpoint
        assert {"global_step10/zero_pp_rank_0_mp_rank_00_model_states.pt"} <= files.keys()
        assert {"global_step10/zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files.keys()
    if name == "fsdp2":
        assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= files.keys()
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(out / "final")
    result = run_torchrun(out / "job.yaml", env, f"output_uri={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == [10]
    assert _losses(out) == _losses(outs[name])
    assert _max_diff(_final_state(out), _final_state(outs[name])) == 0.0


def test_lora_merged_into_a_whole_model(runs, tmp_path):
    """LoRA under ZeRO-3: only the target modules change, and final/ is a merged plain model."""
    from sft_cluster.spec import ModelSpec
    from sft_cluster.train.model import build_model

    _, env = runs
    out = tmp_path / "lora"
    lora = ["strategy.lora.r=8", "strategy.lora.target_modules=[q_proj,v_proj]", "strategy.lora.merge=true"]
    overrides = [*COMMON[1:], *STRATEGIES["zero3"], *lora, f"output_uri={out}"]
    result = run_torchrun(REPO / COMMON[0], env, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = _losses(out)
    assert losses[-1] < losses[0]
    reports = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank-*.json"))]
    assert {r["model_class"] for r in reports} == {"PeftModelForCausalLM"}
    assert [r["parameter_share"] for r in reports] == pytest.approx([0.5, 0.5], abs=0.05)
    assert not list((out / "final").glob("adapter_*"))

    merged = _final_state(out)
    initial = build_model(ModelSpec(name_or_path="builtin:tiny-llama", from_config=True), 42).state_dict()
    changed = {k for k in merged if not torch.equal(merged[k], initial[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed


@pytest.mark.slow
def test_zero2_is_distributed_and_gives_ddps_losses_and_weights(runs, tmp_path):
    """Opt-in (`-m slow`)."""
    outs, env = runs
    out = tmp_path / "zero2"
    result = run_cli(["run", *COMMON, *ZERO2, f"output_uri={out}"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank-*.json"))]
    assert [(r["distributed_type"], r["world_size"]) for r in reports] == [("DEEPSPEED", 2)] * 2
    assert json.loads((out / "strategy.json").read_text())["deepspeed"]["zero_optimization"]["stage"] == 2
    assert max(abs(a - b) for a, b in zip(_losses(out), _losses(outs["ddp"]), strict=True)) <= 1e-5
    assert _max_diff(_final_state(out), _final_state(outs["ddp"])) <= 1e-5


@pytest.mark.slow
def test_zero3_with_optimizer_and_parameter_offload_matches_ddp(runs, tmp_path):
    """Opt-in (`-m slow`): offload JIT-compiles DeepSpeed's cpu_adam (~100 s the first time)."""
    outs, env = runs
    out = tmp_path / "offload"
    offload = ["strategy.deepspeed.offload_optimizer=true", "strategy.deepspeed.offload_params=true"]
    overrides = [*COMMON[1:], *STRATEGIES["zero3"], *offload, f"output_uri={out}"]
    result = run_torchrun(REPO / COMMON[0], env, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    recorded = json.loads((out / "strategy.json").read_text())["deepspeed"]["zero_optimization"]
    assert recorded["offload_optimizer"]["device"] == "cpu" and recorded["offload_param"]["device"] == "cpu"
    losses, reference = _losses(out), _losses(outs["ddp"])
    assert len(losses) == STEPS
    # DeepSpeedCPUAdam is another AdamW implementation: close to DDP's, not bitwise.
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-3


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resumable_copy(source: Path, out: Path) -> Path:
    """A copy of a finished run cut back to its step-10 commit, as if it had stopped there."""
    shutil.copytree(source, out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(out / "final")
    return out


def _assert_resized(out: Path, reference: Path, workers: int, split: str, printed: str) -> None:
    """The resume at ``workers`` trained on that many processes from step 10 to the end, with the
    global batch and learning-rate schedule kept, a loss close to the uninterrupted run's, and the
    re-plan recorded in the plan and said to the user."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == [10]
    reports = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank-*.json"))]
    assert [r["world_size"] for r in reports] == [workers] * workers
    assert len({r["pid"] for r in reports}) == workers
    assert all(r["trained_tokens_seen"] > 100 for r in reports)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == workers
    assert [(h["from"], h["to"], h["step"]) for h in plan["history"]] == [(2, workers, 10)]
    assert (out / "plans" / f"{plan['history'][0]['plan']}.json").exists()  # the commit's own plan, kept
    resumed, uninterrupted = _metrics(out), _metrics(reference)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert [m["learning_rate"] for m in resumed] == pytest.approx([m["learning_rate"] for m in uninterrupted])
    assert resumed[-1]["loss"] == pytest.approx(uninterrupted[-1]["loss"], rel=0.15)
    assert f"resuming at step 10 on {workers} workers (the checkpoint was written by 2)" in printed
    assert split in printed


def test_ddp_resumes_on_four_workers_with_the_global_batch_kept(runs, tmp_path):
    """2 -> 4 workers: at micro batch 4 the global batch of 8 does not split over 4 without
    train.global_batch_size (refused, nothing written); with it, micro batch 2 x accumulation 1."""
    outs, env = runs
    out = _resumable_copy(outs["ddp"], tmp_path / "ddp")
    plan_before = (out / "plan.json").read_text()
    refused = run_torchrun(out / "job.yaml", env, f"output_uri={out}", nproc=4)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert (
        "does not split over 4 workers at micro batch 4: set resources.num_workers to one of 1, 2, or "
        "train.global_batch_size=8 to let the micro batch follow (then any of 1, 2, 4, 8)"
    ) in refused.stderr
    assert (out / "plan.json").read_text() == plan_before
    result = run_torchrun(out / "job.yaml", env, f"output_uri={out}", "train.global_batch_size=8", nproc=4)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    _assert_resized(out, outs["ddp"], 4, "8 rows = micro batch 2 x accumulation 1 x 4 workers", printed)


def test_fsdp2_resumes_on_one_worker_through_the_cli(runs, tmp_path):
    """2 -> 1 worker with `sft-cluster resume RUN --workers 1`: DCP reshards the model and optimizer,
    accumulation doubles."""
    outs, env = runs
    out = _resumable_copy(outs["fsdp2"], tmp_path / "fsdp2")
    result = run_cli(["resume", str(out), "--workers", "1"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    _assert_resized(out, outs["fsdp2"], 1, "8 rows = micro batch 4 x accumulation 2 x 1 workers", printed)
    assert "(was micro batch 4 x accumulation 1)" in printed


def test_zero3_resumes_on_one_worker_through_deepspeeds_universal_checkpoint(runs, tmp_path):
    """2 -> 1 worker under ZeRO-3: the node's first rank fetches both ranks' partitions into its
    own folder (the commit is not written to) and converts them; the run continues from step 10."""
    outs, env = runs
    out = _resumable_copy(outs["zero3"], tmp_path / "zero3")
    committed = sorted(p.name for p in (out / "checkpoints" / "step-00000010").rglob("*"))
    result = run_torchrun(out / "job.yaml", env, f"output_uri={out}", nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert (
        "converted the ZeRO checkpoint of step 10 (2 workers) to DeepSpeed's universal one for 1" in printed
    )
    _assert_resized(out, outs["zero3"], 1, "8 rows = micro batch 4 x accumulation 2 x 1 workers", printed)
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000010").rglob("*")) == committed
