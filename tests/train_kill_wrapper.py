"""Runs `cogalign train` and SIGKILLs itself at the start of optimizer step KILL_AT_STEP (fault
injection for the resume test: the checkpoints before it are complete, the log may be ahead)."""
import os
import signal
import sys


def install() -> None:
    from cogalign.train.trainer import CogalignTrainer

    step, original = int(os.environ["KILL_AT_STEP"]), CogalignTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    CogalignTrainer.training_step = training_step


if __name__ == "__main__":
    install()
    from cogalign.cli import main

    sys.argv = ["cogalign", *sys.argv[1:]]
    main()
