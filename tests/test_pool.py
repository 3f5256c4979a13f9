"""The worker pool keeps input order, bounds memory and survives workers that die."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cogalign.options import ExpandOptions
from cogalign.expand.pool import PreparePool
from cogalign.expand.worker import WorkerContext
from crashy import WorkerKiller
from helpers import EXAMPLES

RECORDS = json.loads(EXAMPLES.read_text())


def ctx():
    return WorkerContext(ExpandOptions(targets=("px",), px_resolution=(8, 8)), EXAMPLES.parent)


def test_order_and_results_match_in_process():
    items = list(enumerate(RECORDS))
    with PreparePool(ctx(), workers=0) as pool:
        serial = [(p.index, p.outcome, p.px_texts) for p in pool.map(items)]
    with PreparePool(ctx(), workers=2, chunk_size=3) as pool:
        parallel = [(p.index, p.outcome, p.px_texts) for p in pool.map(items)]
    assert parallel == serial
    assert [i for i, *_ in serial] == list(range(len(RECORDS)))


def test_workers_do_not_import_torch():
    with PreparePool(ctx(), workers=1) as pool:
        list(pool.map([(0, RECORDS[0])]))
        assert "torch" not in pool._executor.submit(_loaded_modules).result()


def _loaded_modules():
    return set(sys.modules)


def test_a_record_that_kills_its_worker_is_rejected_and_the_run_goes_on():
    sys.path.insert(0, str(Path(__file__).parent))
    killer = WorkerKiller(RECORDS[2])
    items = [(i, killer if i == 2 else r) for i, r in enumerate(RECORDS)]
    with PreparePool(ctx(), workers=2, chunk_size=2, window=2) as pool:  # records after the crash still to read
        results = list(pool.map(items))
        assert pool.restarts == 2  # the crash, then the killer run alone
    assert [p.index for p in results] == list(range(len(RECORDS)))
    crashed = [p for p in results if p.outcome == "reject"]
    assert [(p.index, p.reason) for p in crashed] == [(2, "worker_crashed")]
    assert all(p.outcome in ("expand", "pass") for p in results if p.index != 2)


SCRIPT = """
import sys
from cogalign.expand.validate import validate
from cogalign.options import ExpandOptions
def main():
    result = validate({examples!r}, ExpandOptions(), workers=2, progress=False)
    print("expanded", result.counts["expand"])
{call}
"""


def _run_script(tmp_path: Path, call: str):
    import os
    import subprocess

    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(examples=str(EXAMPLES), call=call))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)


def test_an_unguarded_script_is_told_why_workers_die(tmp_path):
    """README's "whole job from Python" in a plain script: spawn re-imports the script in each worker."""
    proc = _run_script(tmp_path, "main()")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "job.py runs cogalign when it is imported" in last and 'if __name__ == "__main__":' in last, last
    assert "worker_crashed" not in proc.stdout + proc.stderr


def test_a_guarded_script_runs(tmp_path):
    proc = _run_script(tmp_path, 'if __name__ == "__main__":\n    main()')
    assert proc.returncode == 0, proc.stderr[-2000:]
    from cogalign.expand.validate import validate

    expected = validate(EXAMPLES, ExpandOptions(), workers=0, progress=False).counts["expand"]
    assert expected > 0 and proc.stdout.split() == ["expanded", str(expected)]
