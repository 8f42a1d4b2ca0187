"""Chat in the terminal with a model, as `llamafactory-cli chat` does (same as `jaxsft chat`); see jaxsft/chat.py.

    python tools/chat.py --config cfg.yaml [key=value ...]
    python tools/chat.py --checkpoint saves/run/checkpoint_100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsft.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
