"""The data path, side by side in one run, on synthetic chat data in a real S3 server (SeaweedFS).

    .venv/bin/python bench/data.py --rows 10000 1000000

For each size, three readers of the same JSONL objects, each in its own
subprocess (so peak RSS is its own), all with the smoke job's tokenizer,
``max_seq_len``, chat template with assistant masks, best-fit packing and
batches of 8 rows through a torch DataLoader:

- ours: ``build_plan`` + ``PackedDataset`` (stream, tokenize, pack in windows);
- TRL map: ``datasets.load_dataset("json", data_files="s3://...")`` then
  ``SFTTrainer``'s own preparation (tokenize + ``pack_dataset``, bfd) and its
  train DataLoader;
- TRL streaming: the same with ``streaming=True`` (an IterableDataset).

Measured: time to first batch, tokens/s over one epoch (real tokens / time to
produce every row of the epoch, one process), peak RSS, packing efficiency,
and the time to the first batch at 90% of the epoch in a fresh process: ours
from the saved cursor; TRL the way HF Trainer resumes (``skip_first_batches``:
the map dataset is re-loaded from the warm datasets cache and skips by sampler,
the streaming one re-reads and re-tokenizes everything it skips).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._common import peak_rss_mb  # noqa: E402

ASSETS = REPO / "sft_cluster" / "assets"
MAX_SEQ_LEN = 256  # the smoke job's
BATCH = 8
SHARDS = 8
SIDES = ("ours", "trl-map", "trl-streaming")
CURSOR_EVERY = 64  # batches between the cursors ours writes during its epoch (one is the resume point)


def synthetic_rows(count: int, seed: int):
    """Chat records of 1-3 turns built from the smoke data's words (about 80 tokens on average)."""
    text = (ASSETS / "smoke-chat.jsonl").read_text()
    words = sorted(set(re.findall(r"[A-Za-z]+", text)))
    rng = random.Random(seed)
    for _ in range(count):
        turns = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            turns.append(
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 25))) + "?"}
            )
            turns.append(
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(2, 30))) + "."}
            )
        yield {"messages": turns}


def upload(server, rows: int, tmp: Path) -> str:
    """``rows`` records in SHARDS JSONL objects; returns the s3:// prefix."""
    import s3fs

    bucket = server.make_bucket()
    local = tmp / f"rows-{rows}"
    local.mkdir()
    handles = [(local / f"part-{i:02d}.jsonl").open("w") for i in range(SHARDS)]
    for index, row in enumerate(synthetic_rows(rows, seed=rows)):
        handles[index % SHARDS].write(json.dumps(row) + "\n")
    for handle in handles:
        handle.close()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
    fs.put(str(local) + "/", f"{bucket}/data/", recursive=True)
    return f"s3://{bucket}/data"


def _digest(batch) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]


# --- the readers, each run in a child process ------------------------------------------------


def child_ours(prefix: str, endpoint: str, work: Path, resume_batches: int | None) -> dict:
    import torch

    from sft_cluster.data import ShardPlan, build_plan
    from sft_cluster.data.chat import ChatEncoder
    from sft_cluster.data.stream import PackedDataset
    from sft_cluster.spec import DataSpec, ModelSpec, StorageSpec
    from sft_cluster.train.model import load_tokenizer

    encoder = ChatEncoder(load_tokenizer(ModelSpec(name_or_path="builtin:tiny-llama")), "builtin:tiny-llama")
    data = DataSpec.model_validate(
        {
            "sources": [{"uri": prefix}],
            "max_seq_len": MAX_SEQ_LEN,
            "truncation": "truncate",
            "prefetch_rows": 0,  # in the step: the epoch's time is one process's tokenize+pack time
        }
    )
    store = StorageSpec(endpoint_url=endpoint)
    started = time.perf_counter()
    if resume_batches is not None:
        plan = ShardPlan.from_json((work / "plan.json").read_text())
        state = json.loads((work / "cursor.json").read_text())
        dataset = PackedDataset(plan, 0, data, store, encoder, state)
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH)))
        return {"resume_s": time.perf_counter() - started, "digest": _digest(batch)}
    plan = build_plan(data, store, world_size=1, seed=42)
    dataset = PackedDataset(plan, 0, data, store, encoder)
    first = None
    digests = []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=BATCH):
        first = first or time.perf_counter() - started
        digests.append(_digest(batch))
        # As training does at each step: the stream keeps only the windows of the rows in flight,
        # so cursors for the resume below are written as the epoch goes.
        if len(digests) % CURSOR_EVERY == 0:
            (work / f"cursor-{len(digests)}.json").write_text(
                json.dumps(dataset.state_after(len(digests) * BATCH))
            )
        dataset.forget(len(digests) * BATCH)
        if dataset.rows.samples.positions[0].epoch > 0:
            break
    elapsed = time.perf_counter() - started
    at = int(len(digests) * 0.9) // CURSOR_EVERY * CURSOR_EVERY
    (work / "plan.json").write_text(plan.to_json())
    (work / f"cursor-{at}.json").rename(work / "cursor.json")
    for stale in work.glob("cursor-*.json"):
        stale.unlink()
    return {
        "first_batch_s": first,
        "epoch_s": elapsed,
        "tokens": dataset.rows.packed_tokens,
        "rows": dataset.rows.packed_rows,
        "efficiency": dataset.rows.packing_efficiency,
        "batches": len(digests),
        "resume_at": at,
        "resume_digest": digests[at],
        "cursor_bytes": (work / "cursor.json").stat().st_size,
    }


class _Counting:
    """Wraps TRL's collator to count rows and real tokens of each batch."""

    def __init__(self, inner):
        self.inner, self.rows, self.tokens = inner, 0, 0

    def __call__(self, features):
        self.rows += len(features)
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.inner(features)


def child_trl(prefix: str, endpoint: str, work: Path, resume_batches: int | None, streaming: bool) -> dict:
    import datasets
    import transformers
    from accelerate import skip_first_batches
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    )
    started = time.perf_counter()
    dataset = datasets.load_dataset(
        "json",
        data_files=f"{prefix}/*.jsonl",
        split="train",
        streaming=streaming,
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
    )
    args = SFTConfig(
        output_dir=str(work / "trainer"),
        max_steps=10**9,
        per_device_train_batch_size=BATCH,
        max_length=MAX_SEQ_LEN,
        packing=True,
        packing_strategy="bfd",
        assistant_only_loss=True,
        use_cpu=True,
        bf16=False,
        report_to=[],
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = counter = _Counting(trainer.data_collator)
    loader = trainer.get_train_dataloader()
    if resume_batches is not None:
        batch = next(iter(skip_first_batches(loader, resume_batches)))
        return {"resume_s": time.perf_counter() - started, "digest": _digest(batch)}
    first = None
    digests = []
    for batch in loader:
        first = first or time.perf_counter() - started
        digests.append(_digest(batch))
    return {
        "first_batch_s": first,
        "epoch_s": time.perf_counter() - started,
        "tokens": counter.tokens,
        "rows": counter.rows,
        "efficiency": counter.tokens / (counter.rows * MAX_SEQ_LEN),
        "batches": len(digests),
        "resume_at": int(len(digests) * 0.9),
        "resume_digest": digests[int(len(digests) * 0.9)],
    }


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.side == "ours":
        result = child_ours(args.prefix, args.endpoint, work, args.resume_batches)
    else:
        result = child_trl(
            args.prefix, args.endpoint, work, args.resume_batches, args.side == "trl-streaming"
        )
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------


def run_child(side: str, prefix: str, server, work: Path, resume_batches: int | None = None) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",  # datasets treats offline mode as "no s3:// either"; the files are all local
        "HF_HOME": str(work.parent / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, __file__, "--child", side, "--prefix", prefix, "--endpoint", server.endpoint]
    cmd += ["--work", str(work)]
    if resume_batches is not None:
        cmd += ["--resume-batches", str(resume_batches)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{side} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def bench_size(server, rows: int, tmp: Path, sides: list[str]) -> dict[str, dict]:
    prefix = upload(server, rows, tmp)
    results = {}
    for side in sides:
        work = tmp / f"{side}-{rows}"
        work.mkdir()
        epoch = run_child(side, prefix, server, work)
        resumed = run_child(side, prefix, server, work, resume_batches=epoch["resume_at"])
        if resumed["digest"] != epoch["resume_digest"]:
            raise RuntimeError(f"{side}: the batch after resume is not the batch at 90% of the epoch")
        epoch["resume_s"], epoch["resume_peak_rss_mb"] = resumed["resume_s"], resumed["peak_rss_mb"]
        results[side] = epoch
        print(f"  {rows:,} rows, {side}: {json.dumps(epoch)}", flush=True)
    return results


def report(rows: int, results: dict[str, dict]) -> None:
    ours = results["ours"]
    lines = [
        ("time to first batch (s)", "first_batch_s", "{:.2f}", True),
        ("tokens/s, one epoch", None, "{:,.0f}", False),
        ("peak RSS, epoch (MB)", "peak_rss_mb", "{:,.0f}", True),
        ("packing efficiency", "efficiency", "{:.3f}", False),
        ("resume at 90%: first batch (s)", "resume_s", "{:.2f}", True),
        ("peak RSS, resume (MB)", "resume_peak_rss_mb", "{:,.0f}", True),
    ]
    sides = list(results)
    header = (
        f"{'':32}"
        + "".join(f"{side:>16}" for side in sides)
        + "".join(f"{'ours vs ' + side.removeprefix('trl-'):>20}" for side in sides[1:])
    )
    print(
        f"\n{rows:,} rows: {results[sides[-1]]['tokens']:,} tokens an epoch, max_seq_len {MAX_SEQ_LEN}, "
        f"batches of {BATCH} rows (ours reads up to one packing window past the epoch; "
        f"its cursor: {ours['cursor_bytes']} bytes of JSON)"
    )
    print(header)
    for label, key, fmt, lower_is_better in lines:
        values = [
            r["tokens"] / r["epoch_s"] if key is None else r[key] for r in (results[side] for side in sides)
        ]
        ratios = [
            (other / values[0] if lower_is_better else values[0] / other) if other else float("nan")
            for other in values[1:]
        ]
        cells = "".join(f"{fmt.format(v):>16}" for v in values)
        print(f"{label:32}{cells}" + "".join(f"{f'{r:.2f}x':>20}" for r in ratios))
    print("(ratios: how many times better ours is; > 1 is better)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--child", choices=SIDES, dest="side")
    parser.add_argument("--prefix")
    parser.add_argument("--endpoint")
    parser.add_argument("--work")
    parser.add_argument("--resume-batches", type=int)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="ours first")
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    from tests.fixtures.s3 import seaweedfs

    with tempfile.TemporaryDirectory(prefix="sftc-bench-data-") as name:
        tmp = Path(name)
        (tmp / "s3").mkdir()
        with seaweedfs(tmp / "s3") as server:
            os.environ.update(server.env())  # this process and its children, as a job sees them
            results = {}
            for rows in args.rows:
                results[rows] = bench_size(server, rows, tmp, args.sides)
    for rows, sides in results.items():
        report(rows, sides)
    smallest, largest = min(results), max(results)
    if "ours" in args.sides and largest != smallest:
        small, large = results[smallest]["ours"], results[largest]["ours"]
        for key in ("peak_rss_mb", "resume_peak_rss_mb"):
            print(
                f"ours {key} at {largest:,} rows vs {smallest:,}: {large[key]:,.0f} / {small[key]:,.0f} MB "
                f"= {large[key] / small[key]:.3f} (target <= 1.10)"
            )


if __name__ == "__main__":
    main()
