"""`cogalign train` on transformers' Trainer: stages without images, new VQ token rows, the global
shuffle, the run folder's safety, pinned options on resume, options checked before any work, the
Trainer's arguments passed through, LoRA, gradient checkpointing + TensorBoard, held-out eval."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from tests.helpers import (EXAMPLES, FAST, hub_warnings_seen, log_a_hub_retry, one_line_error as _one_line_error,  # noqa: E402
                           run_cli)
from tests.train_fixtures import expand_px, quadrant_set  # noqa: E402

TINY_LR = ["projector=3e-3", "vision_tower=3e-3", "language_model=3e-3"]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quads(tmp_path_factory):
    root = tmp_path_factory.mktemp("quads")
    expand_px(quadrant_set(root / "src", 12, 0), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """6 records: 3 with an image and an RGB turn, 3 text-only (no image at all)."""
    root = tmp_path_factory.mktemp("mixed")
    src = quadrant_set(root / "src", 6, 2)
    records = json.loads(src.read_text())
    for rec in records[3:]:
        del rec["image"]
        rec["conversations"][0]["value"] = "What is this?"
    src.write_text(json.dumps(records))
    expand_px(src, root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def vq_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "out"
    run_cli("expand", EXAMPLES, "--out", out, "--shard-size", "4", "--workers", "0", *FAST)
    return out


def _train(data, out, stage=3, lr=TINY_LR, steps=2, gbs=2, pdbs=1, vq_tokens="text", **kw):
    """An in-process run of a 1-layer tiny model."""
    from cogalign.train.model import add_vq_tokens, load
    from cogalign.train.run import TrainConfig, train
    from cogalign.train.stages import make_plan

    net, processor = load("tiny", data, seed=0, tiny_layers=1, tiny_hidden=32)
    plan = make_plan(stage, lr=lr, global_batch_size=gbs, per_device_batch_size=pdbs)
    if vq_tokens == "special":
        add_vq_tokens(net, processor, 4096)
        plan.new_token_start = processor.tokenizer.convert_tokens_to_ids("<vq_0>")
    cfg = TrainConfig(data, out, plan, max_length=kw.pop("max_length", 512), max_steps=steps, progress=False,
                      vq_tokens=vq_tokens, **kw)
    return train(cfg, net, processor), net


def _cli(*args, expect=2):
    res = run_cli("train", "--model", "tiny", "--no-progress", *map(str, args), expect=expect)
    return res




# ---- defect 1: stage 1 and 2 with micro-batches that hold no image
@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2_train_through_text_only_micro_batches(mixed, tmp_path, stage):
    """Per-device batch 1 over 3 text-only records: those micro-batches never reach the projector or the
    vision tower (the old loop raised `element 0 of tensors does not require grad`)."""
    summary, net = _train(mixed, tmp_path / "run", stage=stage, lr=None, steps=3, gbs=2, pdbs=1)
    assert summary["steps"] == 3 and summary["seen"] == 6
    lines = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(l["loss"]) for l in lines)


# ---- defect 5: --vq-tokens special's new rows train in every stage
def test_new_vq_token_rows_train_in_stage_1(vq_out, tmp_path):
    from cogalign.train.model import add_vq_tokens, load
    from cogalign.train.stages import make_plan, plan_json

    net, processor = load("tiny", vq_out, seed=0, tiny_layers=1, tiny_hidden=32)
    old = len(processor.tokenizer)
    add_vq_tokens(net, processor, 4096)
    plan = make_plan(1)
    plan.new_token_start = old
    groups = {g["name"]: g for g in plan_json(plan, net)["groups"]}
    assert groups["new_token_rows"]["lr"] == 1e-3 and groups["new_token_rows"]["trainable_params"] == 2 * 4096 * 32
    res = _cli("--data", vq_out, "--stage", "1", "--vq-tokens", "special", "--print-plan", expect=0)
    assert [g["name"] for g in json.loads(res.stdout)["groups"]][-1] == "new_token_rows"

    before_in = net.get_input_embeddings().weight.detach().clone()
    before_out = net.get_output_embeddings().weight.detach().clone()
    summary, trained = _train(vq_out, tmp_path / "run", stage=1, lr=None, steps=2, gbs=2, pdbs=2,
                              vq_tokens="special", max_length=1024)
    after_in, after_out = trained.get_input_embeddings().weight, trained.get_output_embeddings().weight
    # same seed, same init: the old rows are bit-identical, new rows moved (in and out)
    assert after_in.shape[0] == before_in.shape[0]
    assert (after_in[:old] == before_in[:old]).all() and (after_out[:old] == before_out[:old]).all()
    assert (after_in[old:] != before_in[old:]).any() and (after_out[old:] != before_out[old:]).any()


# ---- defect 7: one global shuffle per epoch, every record once over ranks
def test_sampler_shuffles_across_shards_once_per_epoch_over_ranks(vq_out):
    import torch.utils.data
    from accelerate.data_loader import BatchSamplerShard

    from cogalign.train.data import PAD, EpochSampler, ShardDataset

    ds = ShardDataset(vq_out, load_images=False)
    assert len(ds.files) == 4 and len(ds) == 14
    shard_of = np.searchsorted(ds.starts, np.arange(14), side="right") - 1
    orders = {}
    for epoch in (0, 1):
        s = EpochSampler(len(ds), seed=3, multiple=4)
        s.set_epoch(epoch)
        orders[epoch] = [i for i in s if i != PAD]
        assert sorted(orders[epoch]) == list(range(14)) and len(list(s)) == 16
        runs = sum(shard_of[a] != shard_of[b] for a, b in zip(orders[epoch], orders[epoch][1:]))
        assert runs > 4  # not one block per shard
        per_rank = []
        for rank in range(2):  # accelerate's split of the same sampler: 2 ranks × batch 2
            bs = BatchSamplerShard(torch.utils.data.BatchSampler(s, 2, False), num_processes=2, process_index=rank)
            per_rank.append([i for b in bs for i in b if i != PAD])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(14))
    assert orders[0] != orders[1]
    again = EpochSampler(len(ds), seed=3, multiple=4)
    assert [i for i in again if i != PAD] == orders[0]  # deterministic by (seed, epoch)
    assert ds[orders[0][0]]["record"]["id"] == ShardDataset(vq_out, load_images=False).record(orders[0][0])["id"]


def test_dataset_reads_any_row_of_parquet_and_jsonl_shards(vq_out, tmp_path):
    from cogalign.train.data import ShardDataset

    jsonl = tmp_path / "jsonl"
    run_cli("expand", EXAMPLES, "--out", jsonl, "--shard-size", "4", "--workers", "0", "--format", "jsonl", *FAST)
    pq_ds = ShardDataset(vq_out, load_images=False, cache=tmp_path / "cache")
    js_ds = ShardDataset(jsonl, load_images=False)
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 4
    for i in (13, 0, 7, 4, 3):  # out of order: random access
        assert pq_ds[i]["record"] == js_ds[i]["record"] == list(js_ds)[i]["record"]
    assert pq_ds[-1]["record"] is None  # a padding slot


def test_group_by_modality_length_keeps_each_batch_one_modality():
    from cogalign.train.data import PAD, EpochSampler

    lengths = np.array([10, -3, 7, -8, 5, -2, 9, -4, 6, 1])
    s = EpochSampler(10, seed=0, multiple=2, lengths=lengths, megabatch=2)
    order = [i for i in s if i != PAD]
    assert sorted(order) == list(range(10))
    batches = [order[i:i + 2] for i in range(0, 10, 2)]
    assert all(len({lengths[j] > 0 for j in b}) == 1 for b in batches)  # 5 + 5: every batch one modality
    assert all(abs(lengths[b[0]]) >= abs(lengths[b[1]]) for b in batches)  # longest first


# ---- defects 9, 10, 11: the run folder
def test_out_that_is_a_file_or_holds_user_files_is_refused(quads, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    _one_line_error(_cli("--data", quads, "--out", f), "is a file")
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": 1}')
    _one_line_error(_cli("--data", quads, "--out", user), "did not write", "config.json")
    assert (user / "config.json").read_text() == '{"mine": 1}'


def test_rerun_needs_resume_or_overwrite_and_resume_pins_options(quads, vq_out, tmp_path):
    run = tmp_path / "run"
    base = ["--data", quads, "--max-steps", "2", "--global-batch-size", "2", "--per-device-batch-size", "1",
            "--max-length", "256", "--save-steps", "1", *sum((["--lr", x] for x in TINY_LR), [])]
    _cli(*base, "--out", run, expect=0)
    assert (run / "checkpoint-2").is_dir() and (run / "cogalign_run.json").is_file()
    (run / "notes.txt").write_text("the user's")
    _one_line_error(_cli(*base, "--out", run), "earlier run", "--resume", "--overwrite")
    assert (run / "checkpoint-2").is_dir()
    line = _one_line_error(_cli(*base, "--out", run, "--resume", "--global-batch-size", "4", "--lr", "projector=1e-3"),
                           "--resume", "global_batch_size", "lr")
    assert "2 → 4" in line
    other = [a if a != quads else vq_out for a in base]
    _one_line_error(_cli(*other, "--out", run, "--resume"), "--resume", "data", "data_fingerprint")
    _cli(*base, "--out", run, "--resume", "--max-steps", "3", expect=0)  # a longer run may continue
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 3
    (run / "checkpoint-3" / "my-eval.txt").write_text("the user's too")  # inside a folder the run wrote
    _one_line_error(_cli(*base, "--out", run, "--overwrite"), "my-eval.txt", "not written by the earlier run")
    assert (run / "checkpoint-3" / "my-eval.txt").is_file() and (run / "train_summary.json").is_file()
    (run / "checkpoint-3" / "my-eval.txt").unlink()
    _cli(*base, "--out", run, "--overwrite", expect=0)
    assert (run / "notes.txt").read_text() == "the user's"  # only the run's own files were replaced
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 2 and not (run / "checkpoint-3").exists()


# ---- defect 12, 13
def test_incomplete_output_is_refused(vq_out, tmp_path):
    """One of 4 shards deleted: the old loop trained on the other 3 without a word."""
    broken = tmp_path / "broken"
    shutil.copytree(vq_out, broken)
    sorted((broken / "data").glob("*.parquet"))[1].unlink()
    _one_line_error(_cli("--data", broken, "--out", tmp_path / "run"), "1 of 4 shards are not complete")
    assert not (tmp_path / "run").exists()


def test_a_run_that_skips_every_record_fails_and_saves_no_model(quads, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _cli("--data", quads, "--out", tmp_path / "run", "--image-root", empty, "--max-steps", "1",
               "--global-batch-size", "2", "--per-device-batch-size", "2", "--max-length", "256")
    _one_line_error(res, "every record was skipped", "image_missing")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "train_summary.json").exists()
    assert not (tmp_path / "run" / "cache").exists()  # the Arrow copy of the shards was left behind
    # no checkpoint of the untrained model is left either: the same command with the inputs fixed runs
    # (it was refused as "an earlier run (checkpoint-1)", and --resume would have learned nothing again)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["cogalign_run.json"]
    _cli("--data", quads, "--out", tmp_path / "run", "--max-steps", "1", "--global-batch-size", "2",
         "--per-device-batch-size", "2", "--max-length", "256", expect=0)


def test_a_diverged_run_stops_in_one_line_and_saves_no_model(quads, tmp_path):
    res = _cli("--data", quads, "--out", tmp_path / "run", "--max-steps", "6", "--global-batch-size", "2",
               "--per-device-batch-size", "2", "--max-length", "256", "--max-grad-norm", "0",
               "--lr", "projector=1e30", "--lr", "vision_tower=1e30", "--lr", "language_model=1e30")
    _one_line_error(res, "diverged", "--lr")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert "NaN" not in log and "Infinity" not in log  # every line written is JSON


# ---- defect 17: bad numbers, one line, before any work
@pytest.mark.parametrize("args,words", [
    (["--global-batch-size", "-1"], ["--global-batch-size -1"]),
    (["--max-length", "0"], ["--max-length 0"]),
    (["--max-steps", "0"], ["--max-steps 0"]),
    (["--epochs", "-1"], ["--epochs -1"]),
    (["--epochs", "0"], ["--epochs 0"]),
    (["--lr", "projector=inf"], ["projector=inf", "finite"]),
    (["--lr", "projector=nan"], ["projector=nan", "finite"]),
    (["--val-size", "0"], ["--val-size"]),
    (["--seed", "-1"], ["--seed -1", "2**32"]),
    (["--lora-r", "2", "--lora-alpha", "inf"], ["--lora-alpha inf"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm -1"]),
    (["--lora-dropout", "nan"], ["--lora-dropout nan"]),
    (["--trainer-arg", "not_a_field=1"], ["not_a_field", "TrainingArguments"]),
    (["--trainer-arg", "learning_rate=1"], ["learning_rate", "--lr"]),
    (["--trainer-arg", "weight_decay=abc"], ["--trainer-arg weight_decay='abc'", "float"]),
    (["--trainer-config", "no_such_file.yaml"], ["--trainer-config", "no such file"]),
    (["--eval-steps", "5"], ["--eval-steps", "--val-size"]),
    (["--merge-lora"], ["--merge-lora", "--lora-r"]),
])
def test_bad_numbers_are_one_line(quads, tmp_path, args, words):
    _one_line_error(_cli("--data", quads, "--out", tmp_path / "run", *args), *words)
    assert not (tmp_path / "run").exists()


def test_a_val_size_larger_than_the_data_leaves_no_arrow_copy_behind(quads, tmp_path):
    """--val-size is checked against the record count once the shards are read: the failed run used to
    leave the shards' uncompressed copy in RUN/cache/, and the folder then passed for an earlier run."""
    run = tmp_path / "run"
    _one_line_error(_cli("--data", quads, "--out", run, "--val-size", "100"), "--val-size 100", "of 12 records")
    assert not (run / "cache").exists()
    _cli("--data", quads, "--out", run, "--val-size", "2", "--max-steps", "1", "--max-length", "128", expect=0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_a_missing_tracker_is_one_line(quads, tmp_path):
    _one_line_error(_cli("--data", quads, "--out", tmp_path / "run", "--report-to", "wandb"), "pip install wandb")
    assert not (tmp_path / "run").exists()


def test_modules_pattern_matching_nothing_is_an_error(quads):
    _one_line_error(_cli("--data", quads, "--modules", "vision_tower=nomatch", "--print-plan"),
                    "vision_tower", "nomatch", "matches no parameter")


# ---- the Trainer's arguments
def test_trainer_arg_values_take_the_fields_type(tmp_path):
    """`eval_strategy=no` was YAML's False (refused by the Trainer), `adam_epsilon=1e-8` a string
    (a torch traceback at the first step)."""
    from cogalign.errors import CogalignError
    from cogalign.train.args import build_training_args, parse_trainer_args

    extra = parse_trainer_args(["eval_strategy=no", "adam_epsilon=1e-8", "save_only_model=true",
                                "report_to=[tensorboard]"], None)
    assert extra == {"eval_strategy": "no", "adam_epsilon": 1e-8, "save_only_model": True, "report_to": ["tensorboard"]}
    assert build_training_args({"output_dir": "unused", **extra}).eval_strategy == "no"
    config = tmp_path / "trainer.yaml"
    config.write_text("eval_strategy: no\n")  # from a file the word is gone: say how to keep it
    with pytest.raises(CogalignError, match="eval_strategy=False: expected .*quote the word"):
        parse_trainer_args(None, config)


def test_trainer_arg_seed_is_refused_for_the_seed_option():
    """`--trainer-arg seed=5` moved the Trainer's seed (and the data order) while the held-out split,
    the tiny model and cogalign_run.json kept `--seed`: one run, two seeds."""
    from cogalign.errors import CogalignError
    from cogalign.train.args import parse_trainer_args

    with pytest.raises(CogalignError, match=r"--trainer-arg seed: set by cogalign train; use --seed"):
        parse_trainer_args(["seed=5"], None)
    assert parse_trainer_args(["data_seed=5"], None) == {"data_seed": 5}


def test_trainer_arguments_arrive(tmp_path):
    from cogalign.train.args import build_training_args, checkpointing_field, parse_trainer_args, training_kwargs
    from cogalign.train.stages import make_plan

    config = tmp_path / "trainer.yaml"
    config.write_text("warmup_steps: 0.1\nlogging_first_step: true\n")
    extra = parse_trainer_args(["adam_beta2=0.95", "optim=adamw_torch"], config)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    options = {"deepspeed": str(ds), "fsdp": "full_shard auto_wrap", checkpointing_field(): True, "bf16": True,
               "max_grad_norm": 0.5, "report_to": ["tensorboard"], "save_total_limit": 3}
    kw = training_kwargs(out=tmp_path / "run", plan=make_plan(2, global_batch_size=8, per_device_batch_size=2),
                         seed=5, max_steps=None, epochs=1.0, options=options, extra=extra, has_eval=False)
    assert kw["deepspeed"] == str(ds) and kw["fsdp"] == "full_shard auto_wrap" and kw[checkpointing_field()]
    assert kw["gradient_accumulation_steps"] == 4 and kw["per_device_train_batch_size"] == 2 and kw["seed"] == 5
    assert kw["warmup_steps"] == 0.1 and kw["adam_beta2"] == 0.95 and kw["logging_first_step"] is True
    assert kw["max_grad_norm"] == 0.5 and kw["average_tokens_across_devices"] and kw["lr_scheduler_type"] == "cosine"
    kw.pop("deepspeed")  # TrainingArguments needs the deepspeed package (GPU only: benchmarks/gpu_check.sh)
    args = build_training_args(kw)
    assert args.adam_beta2 == 0.95 and getattr(args, checkpointing_field()) and args.save_total_limit == 3
    assert args.fsdp and args.bf16 and args.max_grad_norm == 0.5 and args.report_to == ["tensorboard"]


def test_gradient_checkpointing_tensorboard_and_eval_per_kind(quads, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cogalign.train.args import checkpointing_field

    run = tmp_path / "run"
    summary, _ = _train(quads, run, steps=2, gbs=2, pdbs=2, val_size=4, eval_steps=1,
                        options={checkpointing_field(): True, "report_to": ["tensorboard"]})
    assert summary["seen"] == 4  # 2 steps × 2 of the 8 records left after holding out 4
    assert summary["records"] == 12 and summary["held_out"] == 4  # the held-out records are accounted for
    evals = [json.loads(l) for l in (run / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2] and evals[0]["eval_tokens_px"] > 0 and evals[0]["eval_loss_px"] > 0
    events = list((run / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss_px", "eval/loss_px"} <= set(acc.Tags()["scalars"])


def test_lora_trains_the_adapter_and_merges(quads, tmp_path):
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    summary, net = _train(quads, run, steps=2, gbs=2, pdbs=2, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target": None},
                          merge_lora=True)
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "adapter" / "adapter_model.safetensors").exists()
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "multi_modal_projector" in adapter["modules_to_save"]
    from safetensors.torch import load_file

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all("language_model" in k for k in weights if "lora_" in k)
    assert any(bool(v.abs().sum() > 0) for v in lora_b)  # B starts at zero: the adapter trained
    assert any("multi_modal_projector" in k for k in weights)  # the projector is saved with it
    merged = AutoModelForImageTextToText.from_pretrained(run)
    assert merged.config.model_type == "llava" and not any("lora" in n for n, _ in merged.named_parameters())


def test_cli_options_reach_training_arguments(quads, tmp_path, monkeypatch):
    """Each Trainer option of the CLI, caught where our code builds TrainingArguments (DeepSpeed
    itself cannot be built on these CPUs)."""
    import cogalign.train.args as train_args
    from cogalign.errors import CogalignError

    seen = {}

    def capture(kwargs):
        seen.update(kwargs)
        raise CogalignError("captured")

    monkeypatch.setattr(train_args, "build_training_args", capture)
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    _one_line_error(_cli("--data", quads, "--out", tmp_path / "run", "--deepspeed", ds, "--fsdp", "full_shard auto_wrap",
                         "--gradient-checkpointing", "--bf16", "--tf32", "--max-grad-norm", "0.3", "--save-steps", "7",
                         "--save-total-limit", "4", "--report-to", "tensorboard", "--logging-steps", "3", "--seed", "9",
                         "--dataloader-num-workers", "2", "--val-size", "2", "--eval-steps", "5",
                         "--trainer-arg", "adam_beta2=0.9"), "captured")
    from cogalign.train.args import checkpointing_field

    want = {"deepspeed": str(ds), "fsdp": "full_shard auto_wrap", checkpointing_field(): True, "bf16": True,
            "tf32": True, "max_grad_norm": 0.3, "save_steps": 7, "save_total_limit": 4, "report_to": ["tensorboard"],
            "logging_steps": 3, "seed": 9, "dataloader_num_workers": 2, "eval_steps": 5, "eval_strategy": "steps",
            "adam_beta2": 0.9}
    assert {k: seen.get(k) for k in want} == want


def test_a_hub_model_that_cannot_be_fetched_is_one_line_without_retry_warnings(monkeypatch):
    """Offline, --model OWNER/NAME printed two huggingface_hub warnings per retry of every file (66 lines)
    above the error; the loaders now keep them quiet."""
    import logging

    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoProcessor

    from cogalign.errors import CogalignError
    from cogalign.train.model import load

    def offline(*args, **kwargs):
        log_a_hub_retry()
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", offline)
    with hub_warnings_seen() as seen:
        with pytest.raises(CogalignError, match="cannot load model 'someone/llava'"):
            load("someone/llava")
    assert seen == [] and hub_logging.get_verbosity() == logging.WARNING
