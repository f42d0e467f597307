"""``python -m vlkit.cli ...`` (what torchrun, the deepspeed launcher and grid runs start)."""
import sys

from vlkit.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
