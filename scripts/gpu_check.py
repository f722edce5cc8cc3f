"""The GPU check of issue #12: each strategy on one GPU in bf16, exact resume, then bench/gpu.py.

    bash scripts/gpu_wheels.sh               # here: what the GPU image lacks -> .gpu-wheels/
    bash scripts/gpu_check.sh                # on the GPU machine, repo root, $OUT optional
    python scripts/gpu_check.py run --dry    # anywhere: CPU, gloo, fp32, ddp + lora (the test)

``run``: the tiny model with DDP, FSDP2, ZeRO-2, ZeRO-3, LoRA, torch.compile and Liger (both DDP) under
``torchrun --nproc_per_node 1``, all at once on the GPU: topology, bf16, finite and falling losses; then each
resumed exactly from its middle checkpoint; then bench/gpu.py on the ~1B model. ``worker``: the worker under
torchrun, deterministic, noting what it used. ``wheels``: what the GPU image lacks.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS, SAVE_EVERY = 8, 4
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=0", "train.eval_every_n_steps=null"]
COMMON += [f"checkpoint.every_n_steps={SAVE_EVERY}", "checkpoint.keep_last=2", "resources.num_workers=1"]
COMMON += ["tracking=none"]
STRATEGIES = {
    "ddp": ["strategy.kind=ddp"],
    "fsdp2": ["strategy.kind=fsdp", "strategy.fsdp.version=2"],
    "zero2": ["strategy.kind=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.kind=deepspeed", "strategy.deepspeed.stage=3"]
    + ["strategy.deepspeed.param_persistence_threshold=0"],
    "lora": ["strategy.lora.r=8", "strategy.lora.target_modules=[q_proj,v_proj]", "strategy.lora.merge=true"]
    + ["train.learning_rate=5.0e-3"],
    "compile": ["strategy.kind=ddp", "strategy.compile=true"],  # inductor
    "liger": ["strategy.kind=ddp", "strategy.liger=true"],
}
DRY_STRATEGIES = ("ddp", "lora")
DISTRIBUTED_TYPE = {"fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
BENCH_STRATEGIES = ("ddp", "fsdp2", "zero3", "zero2")
REPORT_ENV, WHEEL_PLAN_ENV = "GPU_CHECK_REPORT", "GPU_CHECK_WHEEL_PLAN"
# The GPU image's packages (device tool's KINDS.md, 2026-11-17) this venv has too: used as they are.
IMAGE = frozenset(
    "absl-py accelerate aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi "  # noqa: SIM905
    "charset-normalizer click contourpy cycler einops filelock fonttools frozenlist fsspec grpcio h11 hf-xet "
    "huggingface-hub hypothesis idna iniconfig jinja2 kiwisolver markdown markdown-it-py markupsafe "
    "matplotlib mdurl mpmath msgpack multidict networkx ninja numpy packaging pandas peft pillow pip pluggy "
    "prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pygments pyparsing pytest pytest-timeout "
    "python-dateutil pyyaml regex requests rich safetensors setuptools shellingham six sortedcontainers "
    "sympy tensorboard tensorboard-data-server tokenizers torch tqdm transformers typer typing-extensions "
    "urllib3 werkzeug wrapt xxhash yarl".split()
)
# In the image too, but carried at our version (the image's is not known): datasets 5.2 needs
# fsspec <= 2026.9.0, pydantic 2.14 typing-extensions >= 4.16.
CARRIED_ANYWAY = frozenset({"fsspec", "typing-extensions"})
# Loaded here but not needed there.
NOT_CARRIED = dict.fromkeys(("boto3", "botocore", "s3transfer", "jmespath"), "accelerate uses boto3 if there")
NOT_CARRIED |= dict.fromkeys(("httpx2", "httpcore2", "truststore"), "huggingface_hub 2.x's (1.x uses httpx)")
NOT_CARRIED["sft-cluster"] = "the repository itself, on PYTHONPATH"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def loaded_distributions() -> dict[str, md.Distribution]:
    """{normalized name: distribution} of every module loaded in this process."""
    owners: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        root = str(dist.locate_file(""))
        for file in dist.files or ():
            owners[os.path.normpath(os.path.join(root, str(file)))] = dist
    found = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        dist = owners.get(os.path.normpath(path)) if path else None
        if dist is not None:
            found[normalize(dist.metadata["Name"])] = dist
    return found


def wheel_kind(dist: md.Distribution) -> str:
    """``any`` (one wheel for every Python 3), else ``binary`` (one per Python version)."""
    lines = (dist.read_text("WHEEL") or "").splitlines()
    tags = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")]
    universal = tags and all(t.startswith(("py3-", "py2.py3-")) and t.endswith("-none-any") for t in tags)
    return "any" if universal else "binary"


def wheel_plan() -> dict[str, Any]:
    """What the worker program (and DeepSpeed, for ZeRO) loads that the GPU image lacks."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import sft_cluster.train.__main__  # noqa: F401
    import sft_cluster.train.worker  # noqa: F401

    ray_imported = any(name == "ray" or name.startswith("ray.") for name in sys.modules)
    import deepspeed  # noqa: F401

    carry, skipped = [], {}
    for name, dist in sorted(loaded_distributions().items()):
        if name in NOT_CARRIED or (name in IMAGE and name not in CARRIED_ANYWAY):
            skipped.update({name: NOT_CARRIED[name]} if name in NOT_CARRIED else {})
            continue
        size = sum(f.size or 0 for f in dist.files or ())
        carry.append({"name": name, "version": dist.version, "kind": wheel_kind(dist), "installed": size})
    total = sum(item["installed"] for item in carry)
    return {"ray_imported": ray_imported, "carry": carry, "not_carried": skipped, "installed_total": total}


def wheels_command() -> int:
    """'name version kind' lines for gpu_wheels.sh; exit 1 if the worker program loads Ray."""
    plan = wheel_plan()
    print("\n".join(f"{w['name']} {w['version']} {w['kind']}" for w in plan["carry"]))
    for name, why in plan["not_carried"].items():
        print(f"not carried: {name} ({why})", file=sys.stderr)
    if plan["ray_imported"]:
        print("error: the worker program imports ray (it must not, under torchrun)", file=sys.stderr)
    return 1 if plan["ray_imported"] else 0


def worker_command(argv: list[str]) -> int:
    """Under torchrun (``scripts/gpu_check_worker.py``): the worker program with deterministic
    kernels, and a note of what it used."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    flagged: set[str] = set()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "determinis" in str(message):
            flagged.add(str(message)[:300])
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    from accelerate.state import AcceleratorState

    from sft_cluster.train.__main__ import main

    code = main(argv)
    note: dict[str, Any] = {
        "ray_imported": "ray" in sys.modules,
        "max_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        # The property: under DeepSpeed it reads the precision from DeepSpeed's config.
        "mixed_precision": AcceleratorState().mixed_precision if AcceleratorState._shared_state else None,
        "nondeterministic": sorted(flagged),
        "versions": {name: d.version for name, d in sorted(loaded_distributions().items())},
    }
    if "deepspeed.accelerator" in sys.modules:
        note["ds_accelerator"] = sys.modules["deepspeed.accelerator"].get_accelerator().device_name()
    if os.environ.get(WHEEL_PLAN_ENV):
        note["wheel_plan"] = wheel_plan()
    Path(os.environ[REPORT_ENV]).write_text(json.dumps(note, indent=1))
    return code


def start_run(name: str, out: Path, dry: bool, threads: int, plan: bool) -> subprocess.Popen:
    """One torchrun of the worker for strategy ``name`` into ``out``, logging to ``out``.log."""
    device = [f"strategy.precision={'fp32' if dry else 'bf16'}", f"resources.gpus_per_worker={int(not dry)}"]
    overrides = [*COMMON, *STRATEGIES[name], *device, f"name=gpu-check-{name}", f"output_uri={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env[REPORT_ENV] = f"{out}.note.json"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS (with use_deterministic_algorithms)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if plan:
        env[WHEEL_PLAN_ENV] = "1"
    # The driver (prepare, torchrun's agent, finish) around this check's wrapper of the worker.
    cmd = [sys.executable, "-m", "sft_cluster.driver", str(REPO / "jobs" / "smoke.yaml"), *overrides]
    cmd += ["--executor=torchrun", "--nproc-per-node=1", "--worker-module=scripts.gpu_check_worker"]
    with Path(f"{out}.log").open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], seconds: float) -> dict[str, int | None]:
    """Exit codes; None for a run still going after ``seconds`` (then killed with its workers)."""
    from bench.gpu import stop_tree

    deadline = time.monotonic() + max(seconds, 1)
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    codes = {name: p.poll() for name, p in procs.items()}
    for proc in procs.values():
        stop_tree(proc)
    return codes


def losses(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def judge_first(name: str, run: Path, code: int | None, dry: bool) -> dict[str, Any]:
    """The first run of ``name``: exit, topology, device, precision, losses."""
    result: dict[str, Any] = {"strategy": name, "problems": []}
    note_path = Path(f"{run}.note.json")
    if code != 0 or not note_path.exists():
        result["problems"].append("timed out" if code is None else f"exit {code}")
        return result
    note = json.loads(note_path.read_text())
    report = json.loads((run / "workers" / "rank-00000.json").read_text())
    trained = losses(run)
    result.update(losses=trained, device=report["device"], wrapper=report["model_wrapper"], note=note)
    expected = DISTRIBUTED_TYPE.get(name, "MULTI_CPU" if dry else "MULTI_GPU")
    accelerator = note.get("ds_accelerator") if name.startswith("zero") else "cpu" if dry else "cuda"
    finite = len(trained) == STEPS and all(math.isfinite(x) for x in trained)
    checks = [
        (report["distributed_type"] == expected, f"distributed type {report['distributed_type']}"),
        (report["device"].startswith("cpu" if dry else "cuda"), f"device {report['device']}"),
        (note["mixed_precision"] == ("no" if dry else "bf16"), f"mixed precision {note['mixed_precision']}"),
        (accelerator == ("cpu" if dry else "cuda"), f"DeepSpeed accelerator {accelerator}"),
        (not note["ray_imported"], "ray was imported under torchrun"),
        (finite, f"losses {trained}"),
        (not finite or trained[-1] < trained[0], f"loss did not fall: {trained[0]} -> {trained[-1]}"),
        (name != "compile" or report.get("compiled_graphs", 0) > 0, "torch.compile built no graph"),
        (name != "liger" or "liger-kernel" in note["versions"], "the Trainer never imported liger_kernel"),
    ]
    result["problems"] += [message for ok, message in checks if not ok]
    return result


def prepare_resume(first: Path, resumed: Path) -> None:
    """A copy of the finished run without its last checkpoint and final model: it resumes mid-way."""
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink(missing_ok=True)


def judge_resume(result: dict[str, Any], first: Path, resumed: Path, code: int | None) -> None:
    """The resumed run: from the middle checkpoint, the same per-step losses and weights, bitwise."""
    if code != 0:
        result["resume"] = "timed out" if code is None else f"exit {code}"
        result["problems"].append(f"resume: {result['resume']}")
        return
    resumed_from = json.loads((resumed / "summary.json").read_text()).get("resumed_from")
    again = losses(resumed)
    loss_diff = max((abs(a - b) for a, b in zip(again, result["losses"], strict=False)), default=math.inf)
    model = Path("final", "model.safetensors")
    same_weights = (first / model).read_bytes() == (resumed / model).read_bytes()
    exact = resumed_from == [SAVE_EVERY] and again == result["losses"] and same_weights
    result["resume"] = "exact" if exact else f"max |dloss| {loss_diff:.3g}, weights equal: {same_weights}"
    if not exact:
        result["problems"].append(f"resume from {resumed_from} not exact: {result['resume']}")


def run_bench(seconds: float, out: Path) -> list[dict[str, Any]]:
    """bench/gpu.py on the ~1B model, one strategy after another, within ``seconds``."""
    per = max(60.0, (seconds - 15) / len(BENCH_STRATEGIES))
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--nproc", "1", "--steps", "20", "--warmup", "5"]
    cmd += ["--timeout", str(int(per)), "--strategies", *BENCH_STRATEGIES]
    env = {**os.environ, "OMP_NUM_THREADS": "8", "HF_HUB_OFFLINE": "1"}
    log = out / "bench.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wait_all({"bench": proc}, seconds)
    return parse_bench(log.read_text())


def parse_bench(text: str) -> list[dict[str, Any]]:
    """bench/gpu.py's output: its header line, then a row per strategy, measured or failed."""
    names = "|".join(BENCH_STRATEGIES)
    measured = re.findall(rf"^({names})\s+([\d,]+)\s+(\S+)$", text, flags=re.M)
    rows = [{"strategy": n, "tokens_per_s": float(t.replace(",", "")), "mfu": m} for n, t, m in measured]
    rows += [{"strategy": n, "error": "failed"} for n in re.findall(rf"^({names})\s+failed:$", text, re.M)]
    header = re.search(r"^model .*$", text, flags=re.M)
    return [{"header": header.group(0) if header else "bench: no output (see bench.log)"}, *rows]


def table(results: list[dict[str, Any]], bench: list[dict[str, Any]] | None) -> str:
    lines = [f"{'strategy':<8} {'status':<6} {'device':<8} {'loss first -> last':<20} {'resume':<10} MiB"]
    for r in results:
        trained, memory = r.get("losses") or [math.nan], (r.get("note") or {}).get("max_memory_mib")
        status, resume = "FAIL" if r["problems"] else "ok", str(r.get("resume", "-"))[:10]
        lines.append(
            f"{r['strategy']:<8} {status:<6} {r.get('device', '-'):<8} "
            f"{trained[0]:>8.4f} -> {trained[-1]:<8.4f} {resume:<10} {memory or 0:.0f}"
        )
        lines += [f"    {problem}" for problem in r["problems"]]
    if bench is not None:
        lines += ["", bench[0]["header"], f"{'strategy':<8} {'tokens/s':>12} MFU"]
        for row in bench[1:]:
            measured = f"{row['tokens_per_s']:>12,.0f} {row['mfu']}" if "mfu" in row else "failed (bench.log)"
            lines.append(f"{row['strategy']:<8} {measured}")
    return "\n".join(lines)


def version_of(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def preflight(dry: bool) -> dict[str, Any]:
    """Python, GPU and the versions that matter; a missing package stops the check at once."""
    import torch

    needed = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "pydantic")
    others = ("huggingface-hub", "tokenizers", "pyarrow", "fsspec", "flash-attn", "liger-kernel", "triton")
    versions = {name: version_of(name) for name in (*needed, *others)}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    problems = [f"missing package {name}" for name in needed if versions[name] is None]
    unmet = [line for name in needed[2:] if versions[name] for line in unmet_requirements(name)]
    problems += [] if dry or gpu else ["no CUDA device (torch.cuda.is_available() is False)"]
    info = {"python": sys.version.split()[0], "cuda": torch.version.cuda, "gpu": gpu, "versions": versions}
    return {**info, "unmet (warnings)": unmet, "problems": problems}


def unmet_requirements(name: str) -> list[str]:
    """What ``name`` declares it needs and this environment does not have (a hint, not a failure)."""
    from packaging.requirements import Requirement

    unmet = []
    for text in md.requires(name) or []:
        need = Requirement(text)
        if need.marker is not None and not need.marker.evaluate({"extra": ""}):
            continue
        have = version_of(need.name)
        if have is None or not need.specifier.contains(have, prereleases=True):
            unmet.append(f"{name} needs {need}, found {have}")
    return unmet


def run_command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-runs-"))
    info = preflight(args.dry)
    print(json.dumps(info, indent=1), flush=True)
    if info["problems"]:
        print("\n".join(f"error: {p}" for p in info["problems"]), file=sys.stderr)
        return 3
    names = args.strategies or (DRY_STRATEGIES if args.dry else tuple(STRATEGIES))
    threads = 1 if args.dry else max(1, (os.cpu_count() or 2) // len(names))
    left = lambda: args.budget - (time.monotonic() - started)  # noqa: E731
    # Tiny runs, all at once (they share one GPU, or the CPUs), then their resumes, all at once.
    procs = {n: start_run(n, work / n, args.dry, threads, args.dry and i == 0) for i, n in enumerate(names)}
    codes = wait_all(procs, min(args.wave_seconds, left() - 30))
    results = {n: judge_first(n, work / n, codes[n], args.dry) for n in names}
    print(f"first runs done at {time.monotonic() - started:.0f} s", flush=True)
    ready = [n for n in names if not results[n]["problems"]]
    for n in ready:
        prepare_resume(work / n, work / f"{n}-resume")
    procs = {n: start_run(n, work / f"{n}-resume", args.dry, threads, False) for n in ready}
    codes = wait_all(procs, min(args.wave_seconds, left() - 30))
    for n in ready:
        judge_resume(results[n], work / n, work / f"{n}-resume", codes[n])
    print(f"resumes done at {time.monotonic() - started:.0f} s", flush=True)
    bench = None if args.dry or args.skip_bench else run_bench(left() - 10, out)
    ordered = [results[n] for n in names]
    failed = [r["strategy"] for r in ordered if r["problems"]]
    verdict = f"GPU CHECK {'FAILED: ' + ', '.join(failed) if failed else 'PASSED'}"
    text = f"{table(ordered, bench)}\n{verdict} in {time.monotonic() - started:.0f} s"
    text += f" ({'dry, CPU' if args.dry else info['gpu']})"
    print(text, flush=True)
    (out / "summary.txt").write_text(text + "\n")
    summary = {"preflight": info, "results": ordered, "bench": bench, "passed": not failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out / "runs.log").open("w") as handle:
        for log in sorted(work.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-200:]
            handle.write(f"===== {log.name} (last 200 lines)\n" + "\n".join(tail) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    layout = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=layout)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the check")
    run.add_argument("--dry", action="store_true", help="CPU, gloo, fp32, ddp + lora, no bench")
    run.add_argument("--out", help="folder for summary.txt, summary.json, runs.log, bench.log")
    run.add_argument("--budget", type=float, default=510, help="seconds for everything")
    run.add_argument("--wave-seconds", type=float, default=180, help="limit of each wave of runs")
    run.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), help="default: all (dry: ddp lora)")
    run.add_argument("--skip-bench", action="store_true")
    sub.add_parser("wheels", help="what the GPU image lacks: 'name version kind' lines")
    args = parser.parse_args()
    return run_command(args) if args.command == "run" else wheels_command()


if __name__ == "__main__":
    sys.exit(main())
