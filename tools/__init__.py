"""Command-line tools that are not training or sampling: importing official checkpoints (tools/import_checkpoint.py)."""
