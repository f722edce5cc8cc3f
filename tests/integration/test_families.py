"""The model-family matrix: six real families, each with its own original chat template, train.

Tiny random models of Llama 3, Llama 3.1, Qwen2.5, Qwen3, Gemma 3 (text) and
Phi-3 (``tests/fixtures/families.py``: real config classes, the family's
special tokens and the template TRL ships byte for byte) train the smoke chat
data (multi-turn, system prompts) on 2 torchrun workers over gloo. Every
family trains under DDP; FSDP2, ZeRO-3 and LoRA each on two families, one of
them with tied embeddings, whose save and resume must keep them tied. The
exact masks per family are checked in ``tests/unit/test_chat_families.py``;
here: the run trains tokens, the loss falls, the sharded runs give DDP's
losses and weights, and ``final/`` keeps the original template and generates.

All jobs run one after another in the same two processes
(``tests/fixtures/train_jobs.py``), through the product's own torchrun entry.
The whole cross product is opt-in (``-m slow``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, isolated_environment
from tests.fixtures.families import FAMILIES, build_base_model, build_family, trl_template

STEPS = 10
COMMON = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=0",
    # Constant: a run resumed at step 5 must end with the uninterrupted run's weights.
    "train.lr_scheduler=constant",
    "train.eval_every_n_steps=null",
    "data.eval_fraction=0",
    "checkpoint.every_n_steps=null",  # only the last step: the resumed runs stop at step 5 first
    "tracking=none",
    "model.from_config=false",
]
STRATEGIES = {
    "ddp": ["strategy.kind=ddp"],
    "fsdp2": ["strategy.kind=fsdp", "strategy.fsdp.version=2"],
    "zero3": [
        "strategy.kind=deepspeed",
        "strategy.deepspeed.stage=3",
        "strategy.deepspeed.param_persistence_threshold=0",
    ],
    "lora": ["strategy.kind=ddp", "strategy.lora.r=8"],
}
# A base model with no chat template, trained with model.chat_template=chatml (tokens added).
BASE = "base+chatml"
# Each sharded strategy on an untied and a tied family (the tied one also resumes) and the base.
# In this order: ZeRO-3 runs last in the shared processes (see train_jobs).
MATRIX = {
    "ddp": [*FAMILIES, BASE],
    "lora": ["phi3", "qwen3"],
    "fsdp2": ["llama3_1", "qwen2_5", BASE],
    "zero3": ["llama3", "gemma3", BASE],
}
EXPECTED = {  # distributed type, share of the parameters each rank holds
    "ddp": ("MULTI_CPU", 1.0),
    "fsdp2": ("FSDP", 0.5),
    "zero3": ("DEEPSPEED", 0.5),
    "lora": ("MULTI_CPU", 1.0),
}


def _train(jobs: list[list[str]], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The given jobs (override lists for jobs/smoke.yaml) one after another on 2 torchrun workers."""
    args = []
    for overrides in jobs:
        args += ["--", str(REPO / "jobs" / "smoke.yaml"), *overrides]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "tests.fixtures.train_jobs", *args[1:]],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _matrix(root: Path, matrix: dict[str, list[str]]) -> dict[tuple[str, str], Path]:
    """Train ``matrix`` (strategy -> families) under ``root``: {(strategy, family): run dir}.

    The first family of each sharded strategy's tied pair is also trained to step 5 and then
    resumed to the end, in ``(strategy, family + "-resumed")``.
    """
    env = isolated_environment(root / "home")
    models = {name: [f"model.name_or_path={build_family(name, root / 'models' / name)}"] for name in FAMILIES}
    models[BASE] = [
        f"model.name_or_path={build_base_model(root / 'models' / 'base')}",
        "model.chat_template=chatml",
    ]
    runs, jobs = {}, []
    for strategy, families in matrix.items():
        for family in families:
            out = root / f"{strategy}-{family}"
            runs[strategy, family] = out
            jobs.append([*COMMON, *STRATEGIES[strategy], *models[family], f"output_uri={out}"])
            if strategy in ("fsdp2", "zero3") and family in FAMILIES and FAMILIES[family].tie_word_embeddings:
                resumed = root / f"{strategy}-{family}-resumed"
                runs[strategy, f"{family}-resumed"] = resumed
                first = [*jobs[-1][:-1], f"output_uri={resumed}"]
                jobs += [[*first, "train.max_steps=5"], first]
    result = _train(jobs, env)
    (root / "train.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    return _matrix(tmp_path_factory.mktemp("families"), MATRIX)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _reports(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "workers").glob("rank-*.json"))]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check_trained(run: Path, strategy: str, family: str) -> None:
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.1, (strategy, family, losses)
    assert all(m["grad_norm"] > 0 for m in metrics), (strategy, family)
    reports = _reports(run)
    distributed_type, share = EXPECTED[strategy]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["pid"] != reports[1]["pid"]
    for report in reports:
        assert report["distributed_type"] == distributed_type
        assert report["parameter_share"] == pytest.approx(share, abs=0.05)
        # Each rank trained assistant tokens, and dropped no sample for having none.
        assert report["trained_tokens_seen"] > 100, (strategy, family)
        assert report["data"]["sources"][0]["untrained"] == 0


@pytest.mark.parametrize("strategy,family", [(s, f) for s, fs in MATRIX.items() for f in fs])
def test_each_family_trains_its_assistant_tokens_on_two_workers(runs, strategy, family):
    _check_trained(runs[strategy, family], strategy, family)
    if strategy == "fsdp2":  # wrapped at the model's own decoder layer (its _no_split_modules)
        recorded = json.loads((runs[strategy, family] / "strategy.json").read_text())
        wrap = recorded["accelerate"]["fsdp_config"]["transformer_layer_cls_to_wrap"]
        assert wrap == [FAMILIES[family].decoder_layer if family in FAMILIES else "LlamaDecoderLayer"]
    if strategy == "lora":
        assert {r["model_class"] for r in _reports(runs[strategy, family])} == {"PeftModelForCausalLM"}


@pytest.mark.parametrize("strategy,family", [(s, f) for s in ("fsdp2", "zero3") for f in MATRIX[s]])
def test_sharded_runs_give_ddps_losses_and_weights(runs, strategy, family):
    losses = [m["loss"] for m in _metrics(runs[strategy, family])]
    reference = [m["loss"] for m in _metrics(runs["ddp", family])]
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4
    assert _max_diff(_final_state(runs[strategy, family]), _final_state(runs["ddp", family])) <= 1e-4


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_tied_embeddings_stay_tied_through_a_sharded_save_and_resume(runs, strategy):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    family = next(f for f in MATRIX[strategy] if FAMILIES[f].tie_word_embeddings)
    resumed = runs[strategy, f"{family}-resumed"]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == [5]
    model = AutoModelForCausalLM.from_pretrained(resumed / "final")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any(key.startswith("lm_head") for key in load_file(resumed / "final" / "model.safetensors"))
    # The resumed run ends where the uninterrupted one did.
    assert _max_diff(_final_state(resumed), _final_state(runs[strategy, family])) <= 1e-6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_final_keeps_the_original_template_and_stops_at_the_end_of_a_turn(runs, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec, final = FAMILIES[family], runs["ddp", family] / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == trl_template(spec.template)  # never TRL's training variant
    end_of_turn = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Italy?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_chatml_on_a_base_model_adds_its_tokens_and_grows_the_embeddings(runs, strategy):
    from transformers import AutoConfig, AutoTokenizer

    run = runs[strategy, BASE]
    log = (run.parent / "train.log").read_text()
    said = "added the special tokens <|im_start|>, <|im_end|> to the tokenizer, and the model's embeddings"
    # 580 + 2 tokens, grown to a multiple of 64; said once by each base run (3).
    assert log.count(f"{said} now have 640 rows") == sum(key[1] == BASE for key in runs)
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert (
        len(tokenizer) == 582
        and tokenizer.chat_template == (REPO / "sft_cluster/templates/chatml.jinja").read_text()
    )
    config = AutoConfig.from_pretrained(run / "final")
    assert config.vocab_size == 640 and config.tie_word_embeddings
    if strategy != "ddp":  # the grown embeddings shard and train as the rest
        losses = [m["loss"] for m in _metrics(run)]
        reference = [m["loss"] for m in _metrics(runs["ddp", BASE])]
        assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4
        assert _max_diff(_final_state(run), _final_state(runs["ddp", BASE])) <= 1e-4


@pytest.mark.slow
def test_every_family_under_every_strategy(tmp_path):
    """Opt-in (`-m slow`): the whole cross product, six families by four strategies."""
    runs = _matrix(tmp_path, {strategy: [*FAMILIES, BASE] for strategy in STRATEGIES})
    for (strategy, family), run in runs.items():
        if not family.endswith("-resumed"):
            _check_trained(run, strategy, family)
