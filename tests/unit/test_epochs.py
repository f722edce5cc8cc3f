"""``train.epochs``: the rows of one epoch counted with the stream's code, the steps, the saved count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from sft_cluster.checkpoint import CheckpointStore, Manifest, hash_local_dir
from sft_cluster.console import ProgressDisplay
from sft_cluster.data import DataError, build_plan
from sft_cluster.data.epochs import count_rows, epoch_lengths, rows_of
from sft_cluster.data.packing import pack
from sft_cluster.data.stream import PackedRowStream, RankStream
from sft_cluster.driver.claim import RunComplete, check_start, claim_run
from sft_cluster.spec import DataSpec, StorageSpec, load_job
from sft_cluster.tracking import read_jsonl, run_dir_of
from sft_cluster.train import steps as steps_module
from sft_cluster.train.steps import TrainSteps, epoch_steps, planned_steps, resolve_steps, steps_from_rows
from tests.unit.test_data_plan import FakeEncoder

REPO = Path(__file__).resolve().parents[2]
STORE = StorageSpec()


def write_records(path: Path, count: int, seed: int) -> str:
    """``count`` chat records of 4-60 words in two files (so the plan has several units)."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    for part in range(2):
        with (path / f"part-{part}.jsonl").open("w") as handle:
            for index in range(part, count, 2):
                user = " ".join(f"u{index}" for _ in range(rng.randint(2, 30)))
                answer = " ".join("a" * rng.randint(1, 6) for _ in range(rng.randint(2, 30)))
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path / "part-*.jsonl")


def data_spec(*uris: str, packing: bool = True) -> DataSpec:
    return DataSpec.model_validate(
        {"sources": [{"uri": uri} for uri in uris], "max_seq_len": 64, "packing": packing}
    )


# --- counting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_counted_rows_are_the_rows_the_stream_packs_one_epoch_into(tmp_path, packing):
    """Per rank of 2: the windows the real PackedRowStream fills inside the first epoch give exactly
    the counted rows; the last window (where the stream mixes in epoch 1) is the rest of the pass."""
    data = data_spec(write_records(tmp_path / "d", 300, seed=1), packing=packing)
    plan = build_plan(data, STORE, world_size=2, seed=7, chunk_bytes=2000)
    window = 4
    counted = []
    for rank in range(2):
        epoch = [s for s in RankStream(plan, rank, data, STORE, FakeEncoder()).one_pass()]
        stream = PackedRowStream(plan, rank, data, STORE, FakeEncoder(), window_rows=window)
        rows_inside, inside_samples = [], 0  # rows of windows made of first-epoch samples only
        while True:
            packed = stream.packed_rows
            row = next(stream)
            if stream.packed_rows != packed:  # a window was packed for this row
                if stream.samples.positions[0].epoch > 0:
                    break  # this window reached into epoch 1
                inside_samples = stream.samples.counters[0].samples
            rows_inside.append(row.input_ids)
        rest = pack(
            [(s.input_ids, s.assistant_mask) for s in epoch[inside_samples:]], data.max_seq_len, 0, packing
        )
        count = count_rows(plan, rank, data, STORE, FakeEncoder(), window_rows=window)
        assert count == len(rows_inside) + len(rest)
        assert len(rows_inside) > 3 * window  # many windows, not a one-window corner case
        # The inside rows are the epoch's first samples, in the stream's order (nothing skipped).
        assert _tokens(rows_inside) == sum(len(s.input_ids) for s in epoch[:inside_samples])
        counted.append(count)
    assert min(counted) > 0


def _tokens(rows: list[list[int]]) -> int:
    return sum(sum(1 for t in row if t != 0) for row in rows)


def test_an_epoch_of_several_sources_ends_when_the_last_one_has_been_seen_whole(tmp_path):
    """Source 1 is a quarter of the data at half the weight: it repeats within the epoch, which
    ends with source 0's last first-pass sample."""
    data = data_spec(
        write_records(tmp_path / "big", 240, seed=2), write_records(tmp_path / "small", 60, seed=3)
    )
    plan = build_plan(data, STORE, world_size=1, seed=7)
    lengths = epoch_lengths(plan, 0, data, STORE, FakeEncoder())
    drawn, last_first_pass = [], 0
    for sample in RankStream(plan, 0, data, STORE, FakeEncoder()):
        if sample.source == 0 and sample.epoch > 0:
            break
        drawn.append(sample)
        if sample.source == 0:
            last_first_pass = len(drawn)
    assert list(lengths) == [len(s.input_ids) for s in drawn[:last_first_pass]]
    assert sum(1 for s in drawn[:last_first_pass] if s.source == 0) == 240
    assert sum(1 for s in drawn[:last_first_pass] if s.source == 1) > 60  # repeats


def test_rows_of_windows_and_packing():
    data = data_spec("x")
    assert rows_of([], data) == 0
    assert rows_of([64] * 10, data, window_rows=4) == 10  # full rows
    assert rows_of([32] * 10, data, window_rows=4) == 5  # pairs share a row
    # Windows of 4 rows' tokens: [40, 40, 40, 40, 40, 40, 40] (280 >= 256) then [40]: 7 + 1 rows.
    assert rows_of([40] * 8, data, window_rows=4) == 8
    assert rows_of([10] * 10, data_spec("x", packing=False), window_rows=4) == 10


def test_a_rank_whose_records_are_all_dropped_is_an_error_before_training(tmp_path):
    data = DataSpec.model_validate(
        {"sources": [{"uri": write_records(tmp_path / "d", 20, seed=4)}], "max_seq_len": 16}
    )
    plan = build_plan(data, STORE, world_size=1, seed=7)
    with pytest.raises(DataError, match="no sample in a whole pass"):
        count_rows(plan, 0, data, STORE, _LongEncoder())


class _LongEncoder(FakeEncoder):
    def encode(self, conversation, tools=None):
        return [9] * 100, [1] * 100


# --- steps --------------------------------------------------------------------------------------


def test_steps_are_bounded_by_the_rank_with_fewest_rows():
    assert epoch_steps([100, 90], 1, 8) == 11  # 90 / 8 = 11.25
    assert epoch_steps([100, 90], 2, 8) == 22
    assert epoch_steps([100], 0.29, 1) == 29  # 0.29 * 100 is 28.999... in floats
    assert epoch_steps([7], 0.5, 8) == 0


def _epochs_job(out: Path, *overrides: str):
    return load_job(
        REPO / "jobs" / "smoke.yaml",
        [f"output_uri={out}", "train.max_steps=null", "train.epochs=1", "tracking=none", *overrides],
    )


def test_steps_from_rows_and_the_epoch_of_a_step(tmp_path):
    job = _epochs_job(tmp_path, "train.epochs=2.5", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    steps = steps_from_rows(job, [41, 40], global_rows=8)  # 2 x 2 x 2 workers
    assert steps == TrainSteps(max_steps=25, steps_per_epoch=10.0)
    # The same global batch on 4 workers (micro 1 x accumulation 2): the same steps.
    assert steps_from_rows(job, [41, 40], global_rows=1 * 2 * 4) == steps
    assert steps.epoch(25) == 2.5 and TrainSteps(40).epoch(3) is None
    with pytest.raises(
        DataError, match=r"train.epochs = 0.01 is not one optimizer step.*rank 1\) packs into 40"
    ):
        steps_from_rows(_epochs_job(tmp_path, "train.epochs=0.01"), [41, 40], global_rows=8)


def test_the_count_is_saved_with_the_plan_and_a_restart_reads_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    job = _epochs_job(out)
    plan = claim_run(job, 1, print).plan
    notices: list[str] = []
    settings = {"data.max_seq_len": 256}
    steps = resolve_steps(job, plan, FakeEncoder(), settings, notices.append)
    run = run_dir_of(job)
    saved = json.loads((out / "epochs.json").read_text())
    assert saved["plan"] == plan.id and saved["rows_per_rank"] == [
        count_rows(plan, 0, job.data, job.storage, FakeEncoder(), keep=_train_filter(job))
    ]
    assert steps.max_steps == saved["rows_per_rank"][0] // 4 and planned_steps(job) == steps.max_steps
    assert [e["event"] for e in read_jsonl(run.events)] == ["epochs_counted"]
    assert "counting the packed rows of one epoch" in notices[0]

    def no_counting(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr("sft_cluster.data.epochs.count_rows", no_counting)
    before = (out / "epochs.json").stat().st_mtime_ns
    again = resolve_steps(_epochs_job(out, "train.epochs=2"), plan, FakeEncoder(), settings, notices.append)
    assert again.max_steps == saved["rows_per_rank"][0] * 2 // 4  # more epochs: the same rows, more steps
    assert (out / "epochs.json").stat().st_mtime_ns == before
    assert "not counting again" in notices[-1]
    with pytest.raises(AssertionError, match="counted again"):  # other settings: the count is stale
        resolve_steps(job, plan, FakeEncoder(), {"data.max_seq_len": 128}, notices.append)
    assert resolve_steps(load_job(REPO / "jobs" / "smoke.yaml"), plan, None, {}, print) == TrainSteps(150)


def _train_filter(job):
    from sft_cluster.data.evalset import train_filter

    return train_filter(job.data)


def test_a_run_at_its_counted_last_step_is_complete(tmp_path):
    out = tmp_path / "run"
    job = _epochs_job(out)
    plan = claim_run(job, 1, print).plan
    steps = resolve_steps(job, plan, FakeEncoder(), {}, print)
    local = tmp_path / "staged"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"m")
    store = CheckpointStore(str(out / "checkpoints"))
    store.upload(local, steps.max_steps)
    store.commit(Manifest(step=steps.max_steps, files=hash_local_dir(local)))
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    with pytest.raises(
        RunComplete, match=rf"step {steps.max_steps} of train.epochs 1 \({steps.max_steps} steps\)"
    ):
        check_start(job)
    assert check_start(_epochs_job(out, "train.epochs=2")) is True  # more epochs: it continues
    assert steps_module.planned_steps(_epochs_job(tmp_path / "elsewhere")) is None  # never counted


def test_the_display_takes_the_total_and_the_epoch_from_the_step_events():
    console = Console(record=True, force_terminal=False, width=120)
    with ProgressDisplay(console, None, log_every_seconds=0) as display:
        display.handle([{"kind": "step", "step": 3, "max_steps": 12, "epoch": 0.25, "loss": 1.5}])
    assert "step 3/12  epoch 0.25  loss 1.5000" in console.export_text()
