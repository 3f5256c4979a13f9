"""The `expand` run: shards, workers, the encoder loop, writers, the output folder and its report."""
