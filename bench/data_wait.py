"""Data wait on the step path: rows packed in the step (synchronous) vs a prefetch thread, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_wait.py [--family qwen2_5] [--steps 400]

A simulated training step consumes a micro batch at ``--rate`` tokens/s per rank
(default 50,000: a ~1B model on one H100 at 40% MFU): it sleeps for the batch's
row capacity / rate, as a host thread waits on the GPU, after ``--host-ms`` of
Python work holding the GIL (launching the step's kernels). Each side runs in its
own process on the same synthetic chat JSONL (bench/data.py's records) with the
product's ``PackedDataset`` and a DataLoader: ``data.prefetch_rows: 0`` (rows
tokenized and packed when the step asks, the path before #16) and the default
``data.prefetch_rows`` (a thread ahead of the step). Measured: the time each step
waited for its batch, as a share of step time, over the steps after the first
(the first batch is start-up, reported apart), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._common import peak_rss_mb  # noqa: E402


def _busy(seconds: float) -> None:
    """Python work that holds the GIL, like launching a step's kernels."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def child(args: argparse.Namespace) -> dict:
    import torch

    from sft_cluster.data import build_plan
    from sft_cluster.data.chat import ChatEncoder
    from sft_cluster.data.stream import PackedDataset, collate_rows
    from sft_cluster.spec import DataSpec, ModelSpec, StorageSpec
    from sft_cluster.train.model import load_tokenizer

    model = args.model or "builtin:tiny-llama"
    encoder = ChatEncoder(load_tokenizer(ModelSpec(name_or_path=model)), model)
    data = DataSpec.model_validate(
        {
            "sources": [{"uri": args.data}],
            "max_seq_len": args.seq,
            "truncation": "truncate",
            "prefetch_rows": args.prefetch,
        }
    )
    store = StorageSpec()
    plan = build_plan(data, store, world_size=1, seed=42)
    dataset = PackedDataset(plan, 0, data, store, encoder)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=args.micro, collate_fn=collate_rows))
    step_s = args.micro * args.seq / args.rate
    waits, started = [], time.perf_counter()
    for _ in range(args.steps):
        asked = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - asked)
        _busy(args.host_ms / 1000)
        time.sleep(max(step_s - args.host_ms / 1000, 0))
    wall = time.perf_counter() - started
    steady_wait = sum(waits[1:])
    steady_wall = wall - waits[0]
    dataset.close()
    return {
        "first_batch_s": waits[0],
        "steady_wait_s": steady_wait,
        "steady_wall_s": steady_wall,
        "wait_share": steady_wait / steady_wall,
        "max_wait_s": max(waits[1:]),
        "step_s": step_s,
        "wall_s": wall,
        "rows": dataset.consumed,
        "digest": int(batch["input_ids"].sum()),
        "peak_rss_mb": peak_rss_mb(),
    }


def write_records(folder: Path, count: int) -> str:
    from bench.data import synthetic_rows

    path = folder / "chat.jsonl"
    with path.open("w") as handle:
        for row in synthetic_rows(count, seed=7):
            handle.write(json.dumps(row) + "\n")
    return str(path)


def run_side(args: argparse.Namespace, data: str, prefetch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", data, "--prefetch", str(prefetch)]
    for name in ("steps", "micro", "seq", "rate", "host_ms"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"prefetch={prefetch} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument(
        "--family", help="a real family's tiny model and template (tests/fixtures/families.py)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--micro", type=int, default=2, help="rows per step")
    parser.add_argument("--seq", type=int, default=4096, help="data.max_seq_len")
    parser.add_argument("--rate", type=float, default=50_000, help="tokens/s the simulated step consumes")
    parser.add_argument("--host-ms", type=float, default=5.0, help="GIL-holding work per step (ms)")
    parser.add_argument("--records", type=int, default=60_000)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    from sft_cluster.spec import DataSpec

    default = DataSpec.model_fields["prefetch_rows"].default
    with tempfile.TemporaryDirectory() as tmp:
        if args.family:
            from tests.fixtures.families import build_family

            args.model = str(build_family(args.family, Path(tmp) / args.family))
        data = write_records(Path(tmp), args.records)
        sync, ahead = run_side(args, data, 0), run_side(args, data, default)
    if sync["digest"] != ahead["digest"] or sync["rows"] != ahead["rows"]:
        raise RuntimeError("the two sides trained different rows")
    print(
        f"\n{args.steps} steps of {args.micro} x {args.seq} tokens at {args.rate:,.0f} tokens/s "
        f"({sync['step_s']:.3f} s per step, {args.host_ms:g} ms of it holding the GIL), "
        f"model {args.family or 'builtin:tiny-llama'}\n"
    )
    rows = [
        ("data wait, share of step time (steady)", "wait_share", "{:.2%}"),
        ("data wait, steady total (s)", "steady_wait_s", "{:.2f}"),
        ("longest wait after the first (s)", "max_wait_s", "{:.3f}"),
        ("first batch (s)", "first_batch_s", "{:.2f}"),
        ("wall time (s)", "wall_s", "{:.1f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ]
    print(f"| | prefetch_rows 0 (in the step) | prefetch_rows {default} (thread) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for label, key, fmt in rows:
        ratio = ahead[key] / sync[key] if sync[key] else float("nan")
        print(f"| {label} | {fmt.format(sync[key])} | {fmt.format(ahead[key])} | {ratio:.3f} |")
    met = "met" if ahead["wait_share"] < 0.01 else "NOT met"
    print(f"\ntarget: data wait < 1% of step time with the thread: {ahead['wait_share']:.2%}, {met}")


if __name__ == "__main__":
    main()
