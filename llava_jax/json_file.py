"""Reading the small JSON files of checkpoints (config, index, preprocessor, tokenizer configs) safely."""

from __future__ import annotations

import json
import os
from typing import Any

from llava_jax.errors import CheckpointError, UserError

MAX_CONFIG_BYTES = 64 << 20  # a config or index far larger than any real one is not read into memory


def read_json_object(path: str, error: type[UserError] = CheckpointError, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `path`; `error` (naming the file) if it is missing, too large, not JSON or not an object."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise error(f"{path} is {size} bytes, too large for {what}; the file is not what its name says")
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is not valid JSON ({e}); the file is truncated or corrupt: download it again") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected {what}")
    return data
