"""The small ERNIE-architecture models shipped inside the package (trained by ernie45's own pipeline)."""

from __future__ import annotations

import os

from ernie45.errors import ErnieError

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = ("ernie-tiny", "ernie-tiny-moe")
DEFAULT = "ernie-tiny"


def bundled_path(name: str = DEFAULT) -> str:
    return os.path.join(HERE, name)


def resolve_model_path(path: str | os.PathLike | None) -> str:
    """A user path (a checkpoint directory or a GGUF file), or a bundled model name; None means the default bundled
    model."""
    from ernie45.gguf_file import is_gguf

    if path is None:
        path = DEFAULT
    path = os.fspath(path)
    if path in BUNDLED and not os.path.exists(path):
        p = bundled_path(path)
        if not os.path.isfile(os.path.join(p, "config.json")):
            raise ErnieError(f"the bundled model {path!r} is not present in this installation "
                             "(rebuild it with scripts/build_bundled_models.sh, or pass --model DIR)")
        return p
    if not os.path.exists(path):
        raise ErnieError(f"model path not found: {path}")
    if not (os.path.isdir(path) or is_gguf(path)):
        raise ErnieError(f"model path is neither a checkpoint directory nor a GGUF file: {path}")
    return path
