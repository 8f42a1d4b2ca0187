"""The errors a person must fix. `python -m jaxsft.main` and the tools print their message on one line
(`report`) and exit 2; any other exception is a bug in jaxsft and keeps its traceback.

Every message says what was wrong, where (file, row, key) and how to fix it.
"""

import sys


class UserError(Exception):
    """A mistake in what the user gave jaxsft (config, paths, data, model files), or a condition of the run
    they must act on (a diverged loss, a full disk)."""


class ConfigError(UserError, ValueError):
    """A configuration a person must fix; the message says what and how."""


class InputError(UserError, ValueError):
    """A dataset or model file that exists but cannot be read as given."""


class MissingPath(UserError, FileNotFoundError):
    """A file or directory the config names (directly or through dataset_info.json) is not there."""


def report(e: UserError) -> int:
    """The one line a person sees for a UserError (`error: ...` on stderr); the exit status, 2."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
