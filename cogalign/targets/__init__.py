"""What the new turns are: regions, per-record choices, target text, prompts, splicing (pure, importable)."""
