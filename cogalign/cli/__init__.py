"""The command line: one module per command group, each a thin typer layer over the library.

- `main.py`      the app, `main()`, and the expand group: expand, validate, merge-report, reset
- `templates.py` templates list|show|sample
- `vq.py`        vq train|eval|info|convert; `vq_hub.py` vq list|push|recon
- `hub.py`       publish, export, stats
- `inspect.py`   show, gallery
- `train.py`     train, generate, eval
- `util.py`      what every command prints (one-line errors, status lines) and `--out` checks
"""
from cogalign.cli.main import app, main

__all__ = ["app", "main"]
