"""Hub and trainer interop: publish an output folder, export it for other trainers, measure token budgets.

- `output.py`  read a finished output folder (completeness checks, records in order)
- `publish.py` `cogalign publish`: upload data/, the card and report.json to the Hugging Face Hub
- `export.py`  `cogalign export`: LLaVA JSON/JSONL, LLaMA-Factory sharegpt, TRL messages, each checked per record
- `stats.py`   `cogalign stats`: characters and tokens per turn kind, share of records over a max length
"""
