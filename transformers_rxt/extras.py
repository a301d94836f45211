"""Optional dependencies: the core (`import transformers_rxt`, the model, the tokenizer, the stage trainers of
stages 1-4) needs none of them; the curriculum scripts, dataset loading and stage 5 need the ``train`` extra."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require_extra"]

#: module -> the extra of ``pyproject.toml`` that installs it
EXTRAS: dict[str, str] = {"datasets": "train", "trl": "train", "yaml": "train", "evaluate": "evaluate",
                          "peft": "peft", "nltk": "bench", "sacrebleu": "bench"}


def require_extra(module: str) -> ModuleType:
    """Import ``module`` (an optional dependency), or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = EXTRAS.get(module.split(".")[0], "train")
        raise ImportError(f"this needs the optional dependency {module!r}, which is not installed: "
                          f"pip install 'transformers-rxt[{extra}]'") from error
