"""Deprecated: use `nova-embeddings train` (this wrapper runs it with the same flags)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # works from a checkout without installing
from nova_embeddings.cli import run_deprecated  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_deprecated("train", "train_adapter.py"))
