"""Reading a JSON file the user names (prompts, datalists), with one sentence for each way it fails."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json_file"]


def read_json_file(path: str | os.PathLike, what: str, *, fix: str = "", point_to: str = "",
                   error: type[Exception] = ValueError) -> Any:
    """The JSON document in the file `path`, or `error` with a sentence that names `what` it is.

    The cases: a folder (`point_to` says which file to give instead), a missing file, a file that
    is not JSON (or not UTF-8 text), one nested too deeply to parse, and one that cannot be read
    (permissions, I/O). `fix` is added to the sentences of a file that is there but unusable.
    """
    path = Path(path)
    fix = f" {fix}" if fix else ""
    if path.is_dir():
        raise error(f"The {what} {path} is a folder, not a JSON file. Point to {point_to or 'the .json file'}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"The {what} {path} does not exist. Check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"The {what} {path} is not a readable JSON file: it is not valid JSON ({exc}).{fix}") from None
    except RecursionError:
        raise error(f"The {what} {path} is not a readable JSON file: it is nested too deeply to be a {what}."
                    f"{fix}") from None
    except OSError as exc:
        raise error(f"The {what} {path} cannot be read ({exc.strerror or exc}). Check the path and its "
                    f"permissions.") from None
