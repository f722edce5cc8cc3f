"""Control-plane collectives on a default group that, like NCCL's, serves CUDA tensors only.

``init_process_group("cuda:gloo")`` on CPU registers gloo for the CUDA device
only: a CPU all-reduce on the default group fails exactly as on NCCL ("No
backend type associated with device type cpu"), and barriers and object
collectives fail too (stricter than NCCL). Two real processes run every
control-plane helper of the package on such a group; a scan of the source
fails when code outside ``sft_cluster.train.collectives`` calls a collective.
"""

from __future__ import annotations

import ast
import contextlib
import json
import multiprocessing
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

WORLD = 2


def _control_plane_round(rank: int, tmp: Path) -> dict:
    """Every control-plane helper once, as a rank of a run would call it."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from sft_cluster.checkpoint import CheckpointStore
    from sft_cluster.data import DataError, build_plan
    from sft_cluster.spec import CheckpointSpec, load_job
    from sft_cluster.tracking import run_dir_of
    from sft_cluster.train import collectives, signals
    from sft_cluster.train.checkpointing import (
        CommitCallback,
        fetch_checkpoint,
        files_of_rank,
        find_resume_step,
    )
    from sft_cluster.train.evaluation import EvalCallback
    from sft_cluster.train.plans import plan_from_rank0, prepared_plan

    out: dict = {}
    try:  # the default group really is CUDA-only, as NCCL's is
        dist.all_reduce(torch.ones(1))
        out["default_group_took_cpu"] = True
    except (RuntimeError, ValueError) as exc:
        out["default_group_error"] = str(exc)
    out["all_true"] = [collectives.all_true(True), collectives.all_true(rank == 0)]
    out["any_true"] = [collectives.any_true(rank == 1), collectives.any_true(False)]
    out["sum_max"] = [
        collectives.reduce_numbers([rank + 1.0, 2.0], "sum"),
        collectives.reduce_numbers([rank], "max"),
    ]
    out["gathered"] = collectives.gather_objects({"rank": rank})
    out["broadcast"] = collectives.broadcast_from_rank0(f"from rank {rank}")
    collectives.barrier()

    # An FSDP2 checkpoint's DCP write runs in the upload thread over the background group while
    # the training thread runs control collectives (snapshot.staged_sharded_save).
    import threading

    import torch.distributed.checkpoint as dcp

    group = collectives.background_group()
    writer = threading.Thread(
        target=dcp.save,
        args=({f"shard-{rank}": torch.full((4,), float(rank))},),
        kwargs={"checkpoint_id": str(tmp / "dcp"), "process_group": group},
    )
    writer.start()
    out["beside_the_write"] = [collectives.all_true(True) for _ in range(10)]
    writer.join()
    collectives.barrier()
    out["dcp_files"] = sorted(p.name for p in (tmp / "dcp").iterdir())

    # The checkpoint protocol: stage, split the files, upload, commit, stop flag, resume, fetch.
    store = CheckpointStore(str(tmp / "run" / "checkpoints"))
    trainer_dir = tmp / f"trainer-{rank}"
    staged = trainer_dir / "checkpoint-5"
    staged.mkdir(parents=True)
    (staged / "config.json").write_text("{}")  # every rank stages it: the lowest uploads
    (staged / f"rng_state_{rank}.pth").write_bytes(bytes([rank]) * 64)
    out["my_files"] = files_of_rank(staged, rank, WORLD)
    callback = CommitCallback(store, CheckpointSpec(async_upload=True), rank=rank, world_size=WORLD)
    callback.on_save(
        SimpleNamespace(output_dir=str(trainer_dir)), TrainerState(global_step=5), TrainerControl()
    )
    if rank == 1:
        signals.STOP_REQUESTED.set()  # one rank's signal stops every rank
    control = callback.on_step_end(None, TrainerState(global_step=6, max_steps=10), TrainerControl())
    callback.finish()
    out["stopped"] = control.should_training_stop
    out["committed"] = callback.committed
    choice = find_resume_step(store, rank)
    store.local_folder = lambda step: None  # fetch as from object storage
    folder, fetched = fetch_checkpoint(store, choice[0], choice[1], rank)
    out["resume_step"], out["fetched"] = choice[0], sorted(fetched)
    out["fetched_exist"] = all((folder / rel).exists() for rel in fetched)

    # Eval totals: ranks with uneven batch counts run the same number of passes.
    class Model(torch.nn.Module):
        training = False

        def forward(self, labels, **_):
            return SimpleNamespace(loss=labels.float().mean())

    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.full((1, 3), float(rank + 1))}
    evaluator = EvalCallback(lambda: [batch] * (rank + 1), every_n_steps=1)
    evaluator.trainer = SimpleNamespace(
        model=Model(),
        args=SimpleNamespace(device="cpu"),
        accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
    )
    out["eval_loss"] = evaluator.evaluate()

    # The plan: before the driver wrote it, rank 0's failure to read it reaches every rank; once
    # written (by rank 0 here, as the driver would), rank 0 reads it and every rank gets the same one.
    job_yaml = str(REPO / "jobs" / "smoke.yaml")
    job = load_job(job_yaml, [f"output_uri={tmp / 'prepared'}"])
    try:
        prepared_plan(job, rank)
    except DataError as exc:
        out["unprepared"] = str(exc)
    if rank == 0:
        run = run_dir_of(job)
        plan = build_plan(job.data, job.storage, WORLD, job.train.seed)
        run.save_plan(plan)
    collectives.barrier()
    prepared = prepared_plan(job, rank)  # this rank's view: its own section only
    out["prepared_plan"] = [prepared.id, sorted(prepared.sources[0].ranks)]
    whole = run_dir_of(job).load_plan()
    out["plan"] = plan_from_rank0(rank, lambda: whole if rank == 0 else None).to_json()

    # train.epochs: each rank counts its own share, all get the same steps; then the saved count is read.
    from sft_cluster.data.epochs import count_rows
    from sft_cluster.data.evalset import train_filter
    from sft_cluster.train.steps import resolve_steps
    from tests.unit.test_data_plan import FakeEncoder

    epochs = load_job(job_yaml, [f"output_uri={tmp / 'prepared'}", "train.max_steps=null", "train.epochs=1"])
    first = resolve_steps(epochs, prepared, FakeEncoder(), {}, lambda message: None)
    again = resolve_steps(epochs, prepared, FakeEncoder(), {}, lambda message: None)
    out["epoch_steps"] = [[first.max_steps, first.steps_per_epoch], [again.max_steps, again.steps_per_epoch]]
    keep = train_filter(epochs.data)
    out["own_rows"] = count_rows(prepared, rank, epochs.data, epochs.storage, FakeEncoder(), keep=keep)
    return out


def _worker(rank: int, tmp: Path) -> None:
    import torch.distributed as dist

    result: dict
    try:
        dist.init_process_group(
            "cuda:gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=WORLD
        )
        result = _control_plane_round(rank, tmp)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        result = {"error": traceback.format_exc()}
    (tmp / f"result-{rank}.json").write_text(json.dumps(result))


def test_every_control_plane_helper_runs_on_a_cuda_only_default_group(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(rank, tmp_path)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        assert "default_group_took_cpu" not in result, "the default group must be CUDA-only for this test"
        assert "No backend type associated with device type cpu" in result["default_group_error"]
        assert result["all_true"] == [True, False]
        assert result["any_true"] == [True, False]
        assert result["sum_max"] == [[3.0, 4.0], [1.0]]
        assert result["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert result["broadcast"] == "from rank 0"
        assert result["beside_the_write"] == [True] * 10
        assert result["dcp_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert result["stopped"] is True and result["committed"] == [5]
        assert result["resume_step"] == 5 and result["fetched_exist"]
        # per eval token: rank 0 has 2 counted tokens of 1.0, rank 1 has 4 of 2.0 (labels shift by one)
        assert result["eval_loss"] == pytest.approx((1.0 * 2 + 2.0 * 4) / 6)
        assert "the run was not prepared by the driver" in result["unprepared"]
    # config.json is staged by both ranks and uploaded (and fetched) by rank 0 only.
    assert results[0]["my_files"] == ["config.json", "rng_state_0.pth"]
    assert results[1]["my_files"] == ["rng_state_1.pth"]
    assert "config.json" in results[0]["fetched"] and "config.json" not in results[1]["fetched"]
    assert [r["prepared_plan"] for r in results] == [
        [results[0]["prepared_plan"][0], [rank]] for rank in (0, 1)
    ]
    assert results[0]["plan"] == results[1]["plan"]
    assert results[0]["epoch_steps"] == results[1]["epoch_steps"]
    assert results[0]["epoch_steps"][0] == results[0]["epoch_steps"][1]
    saved = json.loads((tmp_path / "prepared" / "epochs.json").read_text())
    assert saved["rows_per_rank"] == [results[0]["own_rows"], results[1]["own_rows"]]
    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "prepared" / "events.jsonl").read_text().splitlines()
    ]
    assert events.count("epochs_counted") == 1


COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
    "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
    "gather_object", "send", "recv", "isend", "irecv", "new_group", "wait_for_everyone",
}  # fmt: skip
OWNER = Path("sft_cluster/train/collectives.py")


def collective_calls(source: str) -> list[str]:
    """Calls of a collective in ``source``: any ``x.NAME(...)`` but ``collectives.NAME(...)``,
    and ``NAME`` imported from torch.distributed or accelerate (``gather`` too, from those)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in COLLECTIVES
            and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "collectives")
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}()")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("torch.distributed", "accelerate")
        ):
            found += [
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name in COLLECTIVES | {"gather", "broadcast_object_list"}
            ]
    return found


def test_the_scan_sees_a_collective():
    assert collective_calls("import torch.distributed as dist\ndist.barrier()\n") == ["line 2: .barrier()"]
    assert collective_calls("from torch.distributed import all_reduce\n") == ["line 1: import all_reduce"]
    assert collective_calls("self.trainer.accelerator.wait_for_everyone()\n")
    assert collective_calls("collectives.barrier()\n") == []


def test_no_collective_outside_the_control_plane_module():
    offenders = {
        str(path.relative_to(REPO)): calls
        for path in sorted((REPO / "sft_cluster").rglob("*.py"))
        if path.relative_to(REPO) != OWNER and (calls := collective_calls(path.read_text()))
    }
    assert not offenders, f"collectives outside {OWNER} (use its helpers): {offenders}"
