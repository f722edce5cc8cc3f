"""Job and cluster files: defaults, overrides, and the exact lines a user sees for mistakes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sft_cluster.spec import (
    CLUSTER_ADAPTER,
    JobSpec,
    LocalCluster,
    RayCluster,
    SlurmCluster,
    SpecError,
    apply_overrides,
    check_local_paths,
    dump_job_yaml,
    load_cluster,
    load_job,
    parse_overrides,
    resolve_builtin,
    validate_pair,
)

MINIMAL = """\
name: t
model: {name_or_path: builtin:tiny-llama, from_config: true}
data: {sources: [{uri: builtin:smoke-chat.jsonl}]}
train: {max_steps: 10}
"""


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path so sources are shown as relative paths, as a user types them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    return tmp_path


def write(text: str, name: str = "jobs/smoke.yaml") -> str:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_text(text)
    return name


def job_errors(text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_job(write(text), overrides)
    return str(caught.value).splitlines()


def cluster_errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_cluster(write(text, "clusters/c.yaml"))
    return str(caught.value).splitlines()


# --- a valid job ---------------------------------------------------------------


def test_minimal_job_gets_defaults(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL))
    assert job.output_uri == "runs/t"
    assert job.strategy.kind == "ddp"
    assert job.checkpoint.preemption_signals == ["SIGTERM", "SIGUSR1"]
    assert job.resources.num_workers == 1
    assert job.tracking == []
    assert job.data.max_seq_len == 512


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tensorboard", ["tensorboard"]),
        ("[tensorboard, wandb]", ["tensorboard", "wandb"]),
        ("none", []),
        ("null", []),
    ],
)
def test_tracking_accepts_one_name_a_list_or_none(in_tmp: Path, value: str, expected: list) -> None:
    assert load_job(write(MINIMAL + f"tracking: {value}\n")).tracking == expected


def test_dumped_job_loads_back_unchanged(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL + "strategy: {kind: fsdp, fsdp: {reshard_after_forward: false}}\n"))
    text = dump_job_yaml(job)
    assert text.startswith("name: t\noutput_uri: runs/t\nmodel:\n")
    assert load_job(write(text, "resolved.yaml")) == job


def test_yaml_1_2_exponent_floats_in_files(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL.replace("max_steps: 10", "max_steps: 10, learning_rate: 1e-3")))
    assert job.train.learning_rate == 0.001


# --- messages from the brief, exact ---------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ("train:", "trian:", "unknown key 'trian' (did you mean 'train'?)"),
        ("max_steps: 10", "max_steps: -5", "train.max_steps = -5: must be a positive integer"),
        ("max_steps: 10", "max_steps: abc", "train.max_steps = 'abc': expected an integer"),
        (
            "max_steps: 10",
            "max_steps: 10, learning_rate: -0.1",
            "train.learning_rate = -0.1: must be greater than 0",
        ),
        (
            "max_steps: 10",
            "max_steps: 10, lr: 1",
            "unknown key 'train.lr' (valid keys: "
            "max_steps, epochs, micro_batch_size, grad_accum_steps, global_batch_size, learning_rate, "
            "lr_scheduler, warmup_steps, weight_decay, max_grad_norm, seed, logging_steps, "
            "eval_every_n_steps)",
        ),
        ("max_steps: 10", "max_step: 10", "unknown key 'train.max_step' (did you mean 'train.max_steps'?)"),
        (
            "builtin:tiny-llama,",
            "builtin:tiny-llama, tokenzer: x,",
            "unknown key 'model.tokenzer' (did you mean 'model.tokenizer'?)",
        ),
        (
            "uri: builtin:smoke-chat.jsonl",
            "uri: a, wieght: 2",
            "unknown key 'data.sources[0].wieght' (did you mean 'data.sources[0].weight'?)",
        ),
        ("name_or_path: builtin:tiny-llama, ", "", "model.name_or_path: missing (required)"),
        (
            "name: t",
            "name: my job",
            "name = 'my job': must be 1-64 characters, each a letter, a digit, '.', '_' or '-'",
        ),
        ("name: t", "name: 2024", "name = 2024: expected a string (put the value in quotes)"),
        ("[{uri: builtin:smoke-chat.jsonl}]", "[]", "data.sources: must have at least 1 item"),
        ("from_config: true", "from_config: maybe", "model.from_config = 'maybe': expected true or false"),
        (
            "max_steps: 10",
            "max_steps: 10, learning_rate: .nan",
            "train.learning_rate = nan: must be a finite number",
        ),
    ],
)
def test_job_mistake_gives_one_exact_line(in_tmp: Path, old: str, new: str, line: str) -> None:
    assert old in MINIMAL
    assert job_errors(MINIMAL.replace(old, new, 1)) == [f"error: jobs/smoke.yaml: {line}"]


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            "resources: {num_workers: 0}",
            "resources.num_workers = 0: must be a positive integer (at least 1 worker), or "
            "{min: M, max: N} for an elastic run",
        ),
        (
            "resources: {num_workers: {min: 3, max: 2}}",
            "resources.num_workers = {min: 3, max: 2}: min is above max",
        ),
        (
            "resources: {num_workers: {min: 1, max: 2}}",
            "resources.num_workers = {min: 1, max: 2} needs train.global_batch_size: the rows of one "
            "optimizer step over all workers, kept at every world size (e.g. train.global_batch_size: 8)",
        ),
        ("strategy: {kind: fsdpp}", "strategy.kind = 'fsdpp': must be one of 'ddp', 'fsdp', 'deepspeed'"),
        ("strategy: {kind: fsdp, fsdp: {version: 3}}", "strategy.fsdp.version = 3: must be one of 1, 2"),
        (
            "strategy: {lora: {target_modules: 5}}",
            "strategy.lora.target_modules = 5: expected 'all-linear' or a list of module names",
        ),
        (
            "checkpoint: {preemption_signals: [SIGKILL]}",
            "checkpoint.preemption_signals[0] = 'SIGKILL': must be one of 'SIGTERM', 'SIGUSR1', "
            "'SIGUSR2', 'SIGINT'",
        ),
        ("checkpoint: {keep_last: 0}", "checkpoint.keep_last = 0: must be a positive integer"),
        ("data2: 1", "unknown key 'data2' (did you mean 'data'?)"),
        (
            "tracking: tensorbord",
            "tracking[0] = 'tensorbord': must be one of 'tensorboard', 'wandb', 'mlflow'",
        ),
        (
            "strategy: {deepspeed: {stage: 3}}",
            "strategy.deepspeed is set but strategy.kind is 'ddp' (set strategy.kind: deepspeed, "
            "or remove the strategy.deepspeed block)",
        ),
        (
            "strategy: {liger: true}",
            "strategy.liger = true with resources.gpus_per_worker = 0: Liger's kernels are Triton "
            "kernels that need a CUDA GPU (remove strategy.liger, or give the workers GPUs)",
        ),
        ("strategy: {compile: fast}", "strategy.compile = 'fast': expected true or false"),
        (
            "strategy: {kind: deepspeed, deepspeed: {offload_params: true}}",
            "strategy.deepspeed.offload_params: true requires strategy.deepspeed.stage: 3 "
            "(got stage 2; only ZeRO-3 partitions the parameters)",
        ),
    ],
)
def test_section_mistake_gives_one_exact_line(in_tmp: Path, extra: str, line: str) -> None:
    assert job_errors(MINIMAL + extra + "\n") == [f"error: jobs/smoke.yaml: {line}"]


def test_every_problem_is_reported(in_tmp: Path) -> None:
    text = MINIMAL.replace("train:", "trian:") + "resources: {num_workers: 0}\nname2: x\n"
    assert job_errors(text) == [
        "error: jobs/smoke.yaml: resources.num_workers = 0: must be a positive integer (at least 1 worker), "
        "or {min: M, max: N} for an elastic run",
        "error: jobs/smoke.yaml: unknown key 'trian' (did you mean 'train'?)",
        "error: jobs/smoke.yaml: unknown key 'name2' (did you mean 'name'?)",
    ]


def test_missing_key_without_a_typo_is_reported(in_tmp: Path) -> None:
    assert job_errors(MINIMAL.replace("train: {max_steps: 10}", "steps: 10")) == [
        "error: jobs/smoke.yaml: train: missing (required)",
        "error: jobs/smoke.yaml: unknown key 'steps' (valid keys: name, output_uri, model, data, "
        "train, strategy, checkpoint, resources, tracking, storage, export, watchdog)",
    ]


def test_three_mistakes_three_lines(in_tmp: Path) -> None:
    text = MINIMAL.replace("max_steps: 10", "max_steps: -5, learning_rate: -0.1, seeed: 1")
    assert job_errors(text) == [
        "error: jobs/smoke.yaml: train.max_steps = -5: must be a positive integer",
        "error: jobs/smoke.yaml: train.learning_rate = -0.1: must be greater than 0",
        "error: jobs/smoke.yaml: unknown key 'train.seeed' (did you mean 'train.seed'?)",
    ]


def test_compile_runs_anywhere_and_liger_on_gpu_workers(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL + "strategy: {compile: true}\n"))
    assert job.strategy.compile and not job.strategy.liger
    job = load_job(write(MINIMAL + "strategy: {liger: true}\nresources: {gpus_per_worker: 1}\n"))
    assert job.strategy.liger


def test_default_strategy_blocks_with_another_kind_are_fine(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL + "strategy: {kind: ddp, fsdp: {version: 2}}\n"))
    assert job.strategy.kind == "ddp"


def test_eval_steps_need_eval_data(in_tmp: Path) -> None:
    lines = job_errors(MINIMAL.replace("max_steps: 10", "max_steps: 10, eval_every_n_steps: 5"))
    assert lines == [
        "error: jobs/smoke.yaml: train.eval_every_n_steps is set but there is nothing to evaluate on "
        "(set data.eval_fraction, e.g. 0.05, or data.eval sources, or remove train.eval_every_n_steps)"
    ]
    both = MINIMAL.replace("data: {", "data: {eval_fraction: 0.1, eval: [{uri: e.jsonl}], ")
    assert "data.eval and data.eval_fraction are both set" in job_errors(both)[0]


def test_exactly_one_of_max_steps_and_epochs(in_tmp: Path) -> None:
    both = MINIMAL.replace("max_steps: 10", "max_steps: 10, epochs: 2")
    assert job_errors(both) == [
        "error: jobs/smoke.yaml: train.max_steps = 10 and train.epochs = 2 are both set (train for one "
        "of them: remove the other, e.g. with the override train.max_steps=null)"
    ]
    assert job_errors(MINIMAL, ("train.max_steps=null",)) == [
        "error: jobs/smoke.yaml: train.max_steps or train.epochs is required (how long to train: "
        "optimizer steps, e.g. train.max_steps: 1000, or passes over the data, e.g. train.epochs: 1)"
    ]
    assert job_errors(MINIMAL, ("train.max_steps=null", "train.epochs=0")) == [
        "error: jobs/smoke.yaml: train.epochs = 0: must be greater than 0"
    ]
    job = load_job(write(MINIMAL), ("train.max_steps=null", "train.epochs=0.5"))
    assert (job.train.max_steps, job.train.epochs) == (None, 0.5)
    assert load_job(write(dump_job_yaml(job))) == job  # what resume reads back


# --- file-level problems ----------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column(in_tmp: Path) -> None:
    lines = job_errors("name: t\ntrain:\n  max_steps: 10\n   bad: [\n")
    assert len(lines) == 1
    assert lines[0].startswith("error: jobs/smoke.yaml:4:")
    assert ": YAML syntax error: " in lines[0]


def test_yaml_syntax_error_position_is_one_based(in_tmp: Path) -> None:
    lines = job_errors("name: t\nmodel: {a: 1\n")
    assert lines[0].startswith("error: jobs/smoke.yaml:3:1: YAML syntax error: ")


def test_duplicate_key(in_tmp: Path) -> None:
    assert job_errors(MINIMAL + "train: {max_steps: 5}\n") == [
        "error: jobs/smoke.yaml:5:1: YAML syntax error: duplicate key 'train'"
    ]


def test_missing_file(in_tmp: Path) -> None:
    with pytest.raises(SpecError) as caught:
        load_job("jobs/missing.yaml")
    assert str(caught.value) == "error: jobs/missing.yaml: file not found"
    assert caught.value.problems == ["jobs/missing.yaml: file not found"]
    assert caught.value.source == "jobs/missing.yaml"


def test_top_level_must_be_a_mapping(in_tmp: Path) -> None:
    assert job_errors("- a\n- b\n") == [
        "error: jobs/smoke.yaml: the file must be a mapping of keys to values (key: value), not a list"
    ]


def test_empty_file_lists_required_sections(in_tmp: Path) -> None:
    assert job_errors("") == [
        f"error: jobs/smoke.yaml: {key}: missing (required)" for key in ("name", "model", "data", "train")
    ]


# --- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("storage: {options: {secret: s3cr3t}}", "storage.options"),
        ("storage: {options: {client_kwargs: {aws_secret_access_key: x}}}", "storage.options"),
        ("data: {sources: [{uri: a, storage_options: {key: x}}]}", "data.sources[0].storage_options"),
    ],
)
def test_credentials_are_rejected_without_echoing_them(in_tmp: Path, extra: str, where: str) -> None:
    text = MINIMAL.replace("data: {sources: [{uri: builtin:smoke-chat.jsonl}]}\n", "")
    if not extra.startswith("data"):
        text += "data: {sources: [{uri: a}]}\n"
    lines = job_errors(text + extra + "\n")
    assert len(lines) == 1
    assert lines[0].startswith(f"error: jobs/smoke.yaml: {where}: '")
    assert "credentials come from the environment (AWS_ACCESS_KEY_ID" in lines[0]
    assert "s3cr3t" not in lines[0]


def test_storage_options_without_credentials_are_kept(in_tmp: Path) -> None:
    job = load_job(
        write(
            MINIMAL + "storage: {endpoint_url: 'http://127.0.0.1:9000', "
            "options: {anon: false, client_kwargs: {region_name: us-east-1}}}\n"
        )
    )
    assert job.storage.options["client_kwargs"] == {"region_name": "us-east-1"}


# --- overrides --------------------------------------------------------------------------


def test_overrides_parse_values_as_yaml() -> None:
    assert parse_overrides(
        [
            "train.max_steps=40",
            "train.learning_rate=1e-3",
            "data.packing=false",
            "strategy.lora.target_modules=[q_proj, v_proj]",
            "output_uri=s3://b/r",
            "a.b=",
        ]
    ) == [
        (["train", "max_steps"], 40),
        (["train", "learning_rate"], 0.001),
        (["data", "packing"], False),
        (["strategy", "lora", "target_modules"], ["q_proj", "v_proj"]),
        (["output_uri"], "s3://b/r"),
        (["a", "b"], None),
    ]


def test_overrides_apply_and_create_keys(in_tmp: Path) -> None:
    job = load_job(
        write(MINIMAL),
        [
            "train.max_steps=40",
            "train.learning_rate=1e-3",
            "data.packing=false",
            "output_uri=/tmp/r1",
            "strategy.lora.r=8",
            "strategy.lora.merge=true",
            "data.sources[0].weight=2",
        ],
    )
    assert job.train.max_steps == 40
    assert isinstance(job.train.learning_rate, float) and job.train.learning_rate == 0.001
    assert job.data.packing is False
    assert job.output_uri == "/tmp/r1"
    assert job.strategy.lora is not None and job.strategy.lora.r == 8
    assert job.data.sources[0].weight == 2.0


def test_apply_overrides_returns_a_copy() -> None:
    data = {"train": {"max_steps": 10}}
    out = apply_overrides(data, ["train.max_steps=20", "storage.options.anon=true"], "x.yaml")
    assert out == {"train": {"max_steps": 20}, "storage": {"options": {"anon": True}}}
    assert data == {"train": {"max_steps": 10}}


def test_unknown_override_key_suggests_the_closest(in_tmp: Path) -> None:
    assert job_errors(MINIMAL, ("train.max_stepz=40",)) == [
        "error: override 'train.max_stepz=40': unknown key 'train.max_stepz' "
        "(did you mean 'train.max_steps'?)"
    ]


def test_malformed_override(in_tmp: Path) -> None:
    assert job_errors(MINIMAL, ("train.max_steps",)) == [
        "error: override 'train.max_steps': expected KEY=VALUE"
    ]
    with pytest.raises(SpecError) as caught:
        parse_overrides(["train..max_steps=1", "=3"])
    assert caught.value.problems == [
        "override 'train..max_steps=1': expected KEY=VALUE",
        "override '=3': expected KEY=VALUE",
    ]


def test_override_problems_and_file_problems_come_together(in_tmp: Path) -> None:
    lines = job_errors(MINIMAL, ("trian.max_steps=1", "train.max_steps=-5"))
    assert lines == [
        "error: override 'trian.max_steps=1': unknown key 'trian' (did you mean 'train'?)",
        "error: jobs/smoke.yaml: train.max_steps = -5: must be a positive integer",
    ]


# --- local paths ------------------------------------------------------------------------


def job_with(tmp_path: Path, model: str, *uris: str) -> JobSpec:
    sources = ", ".join(f"{{uri: '{uri}'}}" for uri in uris)
    text = f"name: t\nmodel: {{name_or_path: '{model}'}}\ndata: {{sources: [{sources}]}}\n"
    return load_job(write(text + "train: {max_steps: 1}\n", str(tmp_path / "job.yaml")))


def test_existing_local_paths_pass(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("{}\n")
    job = job_with(
        tmp_path,
        f"{tmp_path}/model/",
        f"{tmp_path}/d/*.jsonl",
        f"file://{tmp_path}/d/a.jsonl",
        "s3://bucket/missing/*.jsonl",
    )
    assert check_local_paths(job) == []


def test_hub_ids_are_not_checked(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("{}\n")
    assert check_local_paths(job_with(tmp_path, "Qwen/Qwen2.5-0.5B", str(tmp_path / "a.jsonl"))) == []


def test_missing_local_paths_are_named_with_their_field(tmp_path: Path) -> None:
    job = job_with(tmp_path, f"{tmp_path}/nope", f"{tmp_path}/d/*.jsonl", f"file://{tmp_path}/x.jsonl")
    assert check_local_paths(job) == [
        f"model.name_or_path = '{tmp_path}/nope': no such directory (give an existing local "
        "model folder, a hub id such as 'Qwen/Qwen2.5-0.5B', or builtin:tiny-llama)",
        f"data.sources[0].uri = '{tmp_path}/d/*.jsonl': the pattern matches no files "
        "(check the path and the pattern)",
        f"data.sources[1].uri = 'file://{tmp_path}/x.jsonl': no such file or directory "
        "(check the path; relative paths are from the current directory)",
    ]


@pytest.mark.parametrize("model", ["./nope", "../nope", "~/nope-sft-cluster", "nope/", "a/b/c"])
def test_values_that_cannot_be_hub_ids_must_exist(tmp_path: Path, model: str) -> None:
    (tmp_path / "a.jsonl").write_text("{}\n")
    problems = check_local_paths(job_with(tmp_path, model, str(tmp_path / "a.jsonl")))
    assert problems == [
        f"model.name_or_path = '{model}': no such directory (give an existing local model "
        "folder, a hub id such as 'Qwen/Qwen2.5-0.5B', or builtin:tiny-llama)"
    ]


def test_resolve_builtin() -> None:
    path = resolve_builtin("builtin:tiny-llama")
    assert os.path.isabs(path)
    assert Path(path) == Path(__file__).resolve().parents[2] / "sft_cluster/assets/tiny-llama"
    assert resolve_builtin("s3://b/k") == "s3://b/k"


def test_unknown_builtin_suggests_a_name(tmp_path: Path) -> None:
    job = job_with(tmp_path, "builtin:tiny-lama", "builtin:smoke-chat.jsonl")
    assert check_local_paths(job) == [
        "model.name_or_path = 'builtin:tiny-lama': no such builtin asset (did you mean 'builtin:tiny-llama'?)"
    ]


# --- clusters ---------------------------------------------------------------------------


def test_no_cluster_file_is_local() -> None:
    assert load_cluster(None) == LocalCluster()


def test_each_cluster_kind_loads(in_tmp: Path) -> None:
    assert isinstance(load_cluster(write("kind: local\nnum_cpus: 2\n", "c/l.yaml")), LocalCluster)
    ray = load_cluster(
        write(
            "kind: ray\naddress: http://head:8265\nauth: {mode: token}\n"
            "runtime_env: {env_vars: {TOKENIZERS_PARALLELISM: 'false'}, pass_env: ['AWS_*']}\n",
            "c/r.yaml",
        )
    )
    assert isinstance(ray, RayCluster)
    assert ray.runtime_env.excludes[0] == ".venv" and ray.auth.token_env == "RAY_AUTH_TOKEN"
    slurm = load_cluster(
        write(
            "kind: slurm\npartition: gpu\nnodes: 2\ngpus_per_node: 8\nmem: 64G\ntime: 2-12:00:00\n"
            "container: {kind: pyxis, image: nvcr.io/nvidia/pytorch:24.01-py3}\n"
            "extra_sbatch: ['--mail-type=END']\n",
            "c/s.yaml",
        )
    )
    assert isinstance(slurm, SlurmCluster)
    assert slurm.signal == "B:USR1@300" and slurm.launcher == "ray"
    assert isinstance(CLUSTER_ADAPTER.validate_python({"kind": "slurm"}), SlurmCluster)


def test_cluster_kind_missing_or_unknown(in_tmp: Path) -> None:
    assert cluster_errors("num_cpus: 2\n") == [
        "error: clusters/c.yaml: kind: missing (required: one of 'local', 'ray', 'slurm')"
    ]
    assert cluster_errors("kind: k8s\n") == [
        "error: clusters/c.yaml: kind = 'k8s': must be one of 'local', 'ray', 'slurm'"
    ]


def test_cluster_unknown_key(in_tmp: Path) -> None:
    assert cluster_errors("kind: slurm\npartiton: gpu\n") == [
        "error: clusters/c.yaml: unknown key 'partiton' (did you mean 'partition'?)"
    ]


@pytest.mark.parametrize("time", ["30", "30:00", "01:00:00", "2-12", "2-12:30", "2-12:30:00"])
def test_slurm_time_formats(in_tmp: Path, time: str) -> None:
    assert load_cluster(write(f"kind: slurm\ntime: '{time}'\n", "c/s.yaml")).time == time


@pytest.mark.parametrize("time", ["1h", "1:99", "01:00:00:00", "2-", "-1", ""])
def test_bad_slurm_time(in_tmp: Path, time: str) -> None:
    assert cluster_errors(f"kind: slurm\ntime: '{time}'\n") == [
        f"error: clusters/c.yaml: time = '{time}': must be a Slurm time: MM, MM:SS, HH:MM:SS, "
        "D-HH, D-HH:MM or D-HH:MM:SS"
    ]


@pytest.mark.parametrize(
    ("signal", "launcher"),
    [
        ("B:USR1@300", "ray"),
        ("B:10@90", "ray"),
        ("RB:USR1@60", "ray"),
        ("B:USR1@300", "torchrun"),
        # torchrun's step holds the workers: they checkpoint, exit 75, the script requeues.
        ("USR1", "torchrun"),
        ("SIGTERM@60", "torchrun"),
        ("R:USR1@60", "torchrun"),
    ],
)
def test_slurm_signal_formats(in_tmp: Path, signal: str, launcher: str) -> None:
    text = f"kind: slurm\nlauncher: {launcher}\nsignal: '{signal}'\n"
    assert load_cluster(write(text, "c/s.yaml")).signal == signal


@pytest.mark.parametrize(
    ("signal", "fix"), [("USR1@300", "B:USR1@300"), ("SIGTERM", "B:SIGTERM"), ("R:USR1@60", "RB:USR1@60")]
)
def test_slurm_signal_without_batch_flag_is_rejected_for_ray(in_tmp: Path, signal: str, fix: str) -> None:
    """Slurm would signal the `ray start` steps, not the batch script: no commit, no requeue."""
    assert cluster_errors(f"kind: slurm\nlauncher: ray\nsignal: '{signal}'\n") == [
        f"error: clusters/c.yaml: signal = '{signal}' with launcher: ray: without 'B:' Slurm signals "
        "the job steps (the `ray start` processes) instead of the batch script; the Ray cluster goes "
        f"down before a checkpoint is committed and the job fails without a requeue (use '{fix}')"
    ]
    assert cluster_errors(f"kind: slurm\nsignal: '{signal}'\n")[0].startswith(
        f"error: clusters/c.yaml: signal = '{signal}' with launcher: ray:"
    )  # ray is the default launcher


@pytest.mark.parametrize("signal", ["USR1@abc", "X:USR1", "usr1", "B:", "BB:USR1"])
def test_bad_slurm_signal(in_tmp: Path, signal: str) -> None:
    assert cluster_errors(f"kind: slurm\nsignal: '{signal}'\n") == [
        f"error: clusters/c.yaml: signal = '{signal}': must be [B:]SIGNAL[@SECONDS], e.g. B:USR1@300"
    ]


def test_slurm_problems_are_all_reported(in_tmp: Path) -> None:
    assert cluster_errors("kind: slurm\npartition: gpu h100\nmem: 64GB\nextra_sbatch: [mail-type=END]\n") == [
        "error: clusters/c.yaml: partition = 'gpu h100': must use only letters, digits, '.', '_' and '-'",
        "error: clusters/c.yaml: mem = '64GB': must be a Slurm memory size such as 64G, 500M "
        "or 0 (all of it)",
        "error: clusters/c.yaml: extra_sbatch[0] = 'mail-type=END': must be a long sbatch "
        "option starting with '--', e.g. --mail-type=END",
    ]


def test_ray_credentials_in_env_vars_are_rejected(in_tmp: Path) -> None:
    assert cluster_errors("kind: ray\nruntime_env: {env_vars: {HF_TOKEN: abc}}\n") == [
        "error: clusters/c.yaml: runtime_env.env_vars: 'HF_TOKEN' looks like a credential: "
        "list it in runtime_env.pass_env so it is copied from your environment at submit "
        "time instead of written in a file"
    ]


def test_ray_address_must_be_http(in_tmp: Path) -> None:
    assert cluster_errors("kind: ray\naddress: head:8265\n") == [
        "error: clusters/c.yaml: address = 'head:8265': must be the dashboard's http(s) "
        "address, e.g. http://head-node:8265"
    ]


# --- job and cluster together ------------------------------------------------------------


def test_local_output_on_multi_node_cluster_warns(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL))
    warning = (
        "output_uri = 'runs/t' is a local path on a multi-node cluster: each node would write "
        "its own partial copy, and the run is refused at start; use shared storage such as "
        "s3://bucket/runs/t, or set storage.shared_filesystem: true if the path is on a filesystem "
        "every node mounts"
    )
    assert validate_pair(job, RayCluster(multi_node=True)) == [warning]
    assert validate_pair(job, SlurmCluster(nodes=2)) == [warning]
    assert validate_pair(job, RayCluster()) == []
    assert validate_pair(job, SlurmCluster(nodes=1)) == []
    shared = load_job(write(MINIMAL), ["output_uri=s3://bucket/runs/t"])
    assert validate_pair(shared, SlurmCluster(nodes=4)) == []
    nfs = load_job(write(MINIMAL), ["storage.shared_filesystem=true"])
    assert validate_pair(nfs, SlurmCluster(nodes=4)) == []


def test_gpus_asked_but_not_allocated_warns(in_tmp: Path) -> None:
    job = load_job(write(MINIMAL), ["resources.gpus_per_worker=1"])
    assert validate_pair(job, SlurmCluster(gpus_per_node=0)) == [
        "resources.gpus_per_worker = 1.0 but the Slurm cluster has gpus_per_node = 0: the "
        "workers would wait for GPUs that are never allocated"
    ]


def test_a_shared_gpu_is_refused_when_the_job_is_read(in_tmp: Path) -> None:
    """NCCL cannot put two ranks on one GPU: the job file says so before anything starts."""
    errors = job_errors(MINIMAL, ("resources.gpus_per_worker=0.5",))
    assert len(errors) == 1 and "resources.gpus_per_worker" in errors[0], errors
    assert "each worker needs whole GPUs of its own (0 for CPU, else 1, 2, ...), not 0.5" in errors[0]
    assert load_job(write(MINIMAL), ["resources.gpus_per_worker=2"]).resources.gpus_per_worker == 2
