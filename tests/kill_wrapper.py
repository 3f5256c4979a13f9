"""Runs `cogalign` and SIGKILLs itself at a chosen moment (fault injection for resume tests).

KILL_AT=publish:N   before the N-th shard is renamed into place (its file is fully written)
KILL_AT=marker:N    after the N-th shard is published, before its stats marker
KILL_AT=write:N     in the middle of a shard, at the N-th record written

With `--workers N` a shard worker writes the records: spawn re-imports this script in it
(as `__mp_main__`), where the same patch kills the main process (the run) instead.
"""
import os
import signal
import sys


def install(target=os.getpid) -> None:
    import cogalign.expand.executor as executor
    import cogalign.expand.writer as writer

    where, n = os.environ["KILL_AT"].split(":")
    n, count = int(n), [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(target(), signal.SIGKILL)

    if where == "publish":
        original = writer._publish
        writer._publish = lambda tmp, final: (tick(), original(tmp, final))[1]
    elif where == "marker":
        original_atomic = executor.write_atomic

        def atomic(path, data):
            if path.name.endswith(".json") and not path.name.endswith(".ids.json"):
                tick()
            original_atomic(path, data)
        executor.write_atomic = atomic
    elif where == "write":
        for cls in (writer.ParquetShardWriter, writer.JsonlShardWriter):
            original_write = cls.write

            def write(self, record, image_bytes=None, _orig=original_write):
                tick()
                _orig(self, record, image_bytes)
            cls.write = write


if __name__ == "__mp_main__" and os.environ.get("KILL_AT", "").startswith("write:"):
    install(target=os.getppid)  # a shard worker: kill -9 the run it works for

if __name__ == "__main__":
    install()
    from cogalign.cli import main

    sys.argv = ["cogalign", *sys.argv[1:]]
    main()
