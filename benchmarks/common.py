"""Shared helpers for the benchmarks: machine description, PSS sampling, a stand-in tokenizer.

Only the standard library is imported at module level: `bench_expand.py` runs `expand`, whose
worker processes are spawned and re-import the main script, so heavy imports stay inside
functions.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# The architecture of the shipped demo tokenizer (cogalign vq train's defaults).
DEMO_ARCH = {"ch": 32, "ch_mult": (1, 2, 2, 4), "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4, "codes": 4096}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def total_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_lines(device: str | None = None) -> list[tuple[str, str]]:
    """(key, value) rows that say where a table was measured."""
    rows = [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("cpu", f"{cpu_model()}, {usable_cores()} usable cores, {total_memory_gib():.0f} GiB RAM"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
    ]
    if "torch" in sys.modules or device:
        import torch

        rows.append(("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads"))
        if device and device.startswith("cuda"):
            rows.append(("gpu", f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"))
    return rows


def make_random_taming(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight taming checkpoint (model.safetensors + config.yaml) with the demo
    tokenizer's architecture: same FLOPs, meaningless codes. For timing only."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from cogalign.tokenizers.taming import TamingVQTokenizer
    from cogalign.tokenizers.training.export import taming_config
    from cogalign.tokenizers.training.model import make_ddconfig

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.yaml").is_file():
        return out_dir
    a = DEMO_ARCH
    dd = make_ddconfig(a["ch"], a["ch_mult"], a["num_res_blocks"], a["z_channels"])
    cfg = taming_config(dd, a["codes"], a["embed_dim"])
    torch.manual_seed(seed)
    model = TamingVQTokenizer(cfg["model"]["params"], name="random-demo-arch")
    # Spread the codebook over the range the random encoder produces, so many codes are used.
    with torch.no_grad():
        probe = model.pre_quant(torch.rand(2, 3, 64, 64) * 2 - 1)
        flat = probe.permute(0, 2, 3, 1).reshape(-1, probe.shape[1])
        mean, std = flat.mean(0), flat.std(0)
        model.quantize.embedding.weight.copy_(torch.randn_like(model.quantize.embedding.weight) * std + mean)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    with open(out_dir / "config.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return out_dir


class PssSampler:
    """Peak PSS (proportional set size) of a process and all its descendants, sampled in a
    thread every `interval` seconds. PSS shares each shared page among the processes that map
    it, so the sum over a process tree counts every page once."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        psutil = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:  # exited between listing and reading
                pass
        if total > self.peak:
            self.peak, self.peak_processes = total, len(procs)
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], interval: float = 0.2, env: dict | None = None, cwd: str | None = None):
    """Run `cmd`, sampling the PSS of its process tree. -> (returncode, seconds, peak PSS bytes,
    processes at the peak, max RSS bytes of the command's own process from wait4 (catches
    spikes shorter than the sampling period), stderr tail)."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    with PssSampler(proc.pid, interval) as sampler:
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    reader.join()
    tail = b"".join(err_chunks).decode("utf-8", "replace")[-2000:]
    return rc, seconds, sampler.peak, sampler.peak_processes, usage.ru_maxrss * 1024, tail


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
