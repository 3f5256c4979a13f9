"""Training runs: DDP on 2 gloo ranks matches 1 rank, --resume continues the curve, and the
learning check (the model learns RGB answers from the images, and not from shuffled ones)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.train_fixtures import expand_px, quadrant_set, shuffle_answers  # noqa: E402

TINY_LR = ["--lr", "projector=3e-3", "--lr", "vision_tower=3e-3", "--lr", "language_model=3e-3"]


def _train(*args, nproc: int = 1, timeout: int = 600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "cogalign", "train", "--model", "tiny", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]


def _curve(run: Path, key: str = "loss") -> list[float]:
    return [line[key] for line in _log(run)]


def _expanded_quadrants(tmp_path_factory, name: str, n: int, seed: int) -> Path:
    """`n` quadrant records (seeded), expanded with RGB targets: the output folder."""
    root = tmp_path_factory.mktemp(name)
    expand_px(quadrant_set(root / "src", n, seed), root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def quads(tmp_path_factory):
    return _expanded_quadrants(tmp_path_factory, "quads", 24, 0)


def test_two_gloo_ranks_match_one_rank(quads, tmp_path):
    """Two epochs of 24 records at global batch 16: each epoch is a full step and a half step (the
    ranks' shares run out: padding and the one-token dummy batch), and the second epoch reshuffles."""
    common = ["--data", quads, "--stage", "3", *TINY_LR, "--global-batch-size", "16", "--max-steps", "4",
              "--max-length", "128"]
    _train(*common, "--out", tmp_path / "one", "--per-device-batch-size", "8")
    two = _train(*common, "--out", tmp_path / "two", "--per-device-batch-size", "4", nproc=2)
    assert "ranks: 2" in two.stderr
    one_log, two_log = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [l["epoch"] for l in one_log] == [0, 0, 1, 1] == [l["epoch"] for l in two_log]
    assert [l["tokens"] for l in two_log] == [l["tokens"] for l in one_log]  # the same records per step
    # the schedule advances once per optimizer step whatever the world size
    assert [l["lr"]["projector"] for l in two_log] == pytest.approx([l["lr"]["projector"] for l in one_log], rel=1e-9)
    one_curve, two_curve = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert one_curve[0] > one_curve[-1]
    assert two_curve == pytest.approx(one_curve, rel=1e-4)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["seen"] == 48 and summary["world_size"] == 2  # 2 epochs × 24 records


def test_resume_continues_the_curve(quads, tmp_path):
    """kill -9 at the start of step 5 (checkpoint-3 complete, the log written up to step 4), then
    --resume: the same curve as the run that was never interrupted."""
    args = ["--data", quads, *TINY_LR, "--global-batch-size", "4", "--per-device-batch-size", "2",
            "--max-steps", "6", "--max-length", "128", "--save-steps", "3", "--no-progress"]
    _train(*args, "--out", tmp_path / "full")
    full = _curve(tmp_path / "full")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": "5"}
    wrapper = Path(__file__).with_name("train_kill_wrapper.py")
    killed = subprocess.run([sys.executable, str(wrapper), "train", "--model", "tiny", *map(str, args), "--out", str(run)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(_curve(run)) == 4 and not (run / "model.safetensors").exists()
    _train(*args, "--out", run, "--resume")
    resumed = _curve(run)
    assert len(resumed) == 6 and resumed[:3] == full[:3]
    assert resumed[3:] == pytest.approx(full[3:], rel=1e-4)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(run)
    assert AutoModelForImageTextToText.from_pretrained(run).config.model_type == "llava"
    assert (run / "model.safetensors").exists()


def test_resume_of_a_finished_run_trains_nothing(quads, tmp_path):
    """A run that stopped mid-epoch at --max-steps, resumed with the same options (a requeued job): the
    Trainer used to train one step past --max-steps and replace the model."""
    args = ["--data", quads, *TINY_LR, "--global-batch-size", "4", "--per-device-batch-size", "2",
            "--max-steps", "2", "--max-length", "128", "--out", tmp_path / "run"]
    _train(*args)
    model, log = (tmp_path / "run" / "model.safetensors").read_bytes(), _log(tmp_path / "run")
    again = _train(*args, "--resume")
    assert "steps: 2 " in again.stderr and not (tmp_path / "run" / "checkpoint-3").exists()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == model and _log(tmp_path / "run") == log
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 2
    fewer = [str(a) for a in args]
    fewer[fewer.index("--max-steps") + 1] = "1"  # fewer steps than the run holds: it trained nothing, silently
    proc = subprocess.run([sys.executable, "-m", "cogalign", "train", "--model", "tiny", "--no-progress", *fewer,
                           "--resume"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "already at step 2 (checkpoint-2); give --max-steps 2 or more" in proc.stderr


def test_checkpoint_rotation_keeps_a_checkpoint_holding_your_file(quads, tmp_path):
    """--save-total-limit rotation (the Trainer's) deleted an old checkpoint-N/ whole, a file the user had put
    there included; now that checkpoint stays, and the others rotate as before."""
    run = tmp_path / "run"
    args = ["--data", quads, *TINY_LR, "--global-batch-size", "4", "--per-device-batch-size", "2", "--max-length", "128",
            "--save-steps", "1", "--out", run]
    _train(*args, "--max-steps", "2")
    (run / "checkpoint-1" / "notes").mkdir()
    (run / "checkpoint-1" / "notes" / "mine.txt").write_text("mine")
    _train(*args, "--max-steps", "4", "--resume")
    assert (run / "checkpoint-1" / "notes" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


@pytest.fixture
def one_thread():
    """torch on one intra-op thread, as the subprocess runs above (OMP_NUM_THREADS=1): for a model
    this small, a second thread only adds synchronisation, and on a busy 2-core machine threads that
    wait for each other made this test 3-4× slower (670 s instead of about 75 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_learning_check_rgb_from_images(tmp_path, one_thread):
    """Train tiny on one-pixel RGB answers (the upper-left quadrant's colour, palette of 4), then
    answer held-out images. With the true answers it must be far above chance (1/4); with the
    answers shuffled across records (image pairing broken) it must fall back to about chance."""
    from cogalign.train.evaluate import score
    from cogalign.train.generate import run_generate
    from cogalign.train.model import load
    from cogalign.train.run import TrainConfig, train
    from cogalign.train.stages import make_plan

    expand_px(quadrant_set(tmp_path / "tr", 160, 0), tmp_path / "train", regions="upper-left")
    expand_px(quadrant_set(tmp_path / "te", 40, 1, prefix="t"), tmp_path / "test", regions="upper-left")
    exact = {}
    for name in ("true", "shuffled"):
        if name == "shuffled":
            shuffle_answers(tmp_path / "train")
        net, processor = load("tiny", tmp_path / "train", seed=0)
        plan = make_plan(3, lr=["projector=3e-3", "vision_tower=3e-3", "language_model=3e-3"],
                         global_batch_size=16, per_device_batch_size=16)
        summary = train(TrainConfig(tmp_path / "train", tmp_path / name, plan, max_length=256, max_steps=120,
                                    progress=False, log_every=20), net, processor)
        assert summary["truncated_records"] == 0 and summary["skipped"] == 0
        run_generate(tmp_path / name, tmp_path / "test", tmp_path / f"{name}.jsonl", max_new_tokens=24, progress=False)
        result = score(tmp_path / "test", tmp_path / f"{name}.jsonl")
        assert result["px"]["n"] == 40 and result["px"]["format_ok"] == 1.0
        exact[name] = result["px"]["exact_match"]
    print("learning check exact match:", exact)
    assert exact["true"] >= 0.8, exact
    assert exact["shuffled"] <= 0.45 and exact["true"] - exact["shuffled"] >= 0.5, exact


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    return _expanded_quadrants(tmp_path_factory, "five", 5, 1)


def test_two_ranks_where_only_one_has_a_record(five, tmp_path):
    """5 records at global batch 4, one per device: the second step holds 1 record and 3 padding
    slots, so rank 1's first micro-batch is empty while rank 0 runs the model. That rank skipped
    the forward, and both ranks hung in DDP."""
    common = ["--data", five, *TINY_LR, "--global-batch-size", "4", "--per-device-batch-size", "1",
              "--max-steps", "2", "--max-length", "96"]
    _train(*common, "--out", tmp_path / "two", nproc=2, timeout=150)
    log = _log(tmp_path / "two")
    assert [l["step"] for l in log] == [1, 2] and all(math.isfinite(l["loss"]) for l in log)
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["seen"] == 5
