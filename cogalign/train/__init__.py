"""Training on `expand` output: the data path (data.py, collate.py), Table 7 stage presets
(stages.py), the `tiny` model (model.py), the training loop (run.py), greedy decoding of the
inserted turns (generate.py) and their scores (evaluate.py). transformers is imported lazily."""
