"""Publishing RxT models on the Hugging Face Hub: a complete, gated, RAML v1.0 repository in one call.

What a published RxT repository holds:

* `model.safetensors` (or shards + index) and `config.json` with `auto_map`, so that
  `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works without this package;
* the modelling code that `save_pretrained` copies next to the weights (`configuration_rxt.py`,
  `modeling_rxt.py`, `cache_rxt.py`, `interaction_rxt.py`, `tokenization_rxt.py`);
* the tokenizer files, when a tokenizer is given or already saved in the directory;
* `README.md` (the RAML v1.0 card from :func:`~transformers_rxt.hub.build_model_card`), a `LICENSE` pointer
  and `rxt_training_stages.json` (the stage history, when known).

Gating is a repository *setting*, not card metadata: :func:`push_rxt_to_hub` turns it on with
`HfApi.update_repo_settings(repo_id, gated=...)` right after creating the repository and before any file is
uploaded, so the weights are never reachable without the licence form.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers_rxt_cli import add_push_parser

from .cards import STAGES_FILE, build_model_card, license_pointer_text, load_training_stages, validate_model_card

__all__ = ["HUB_FILE_PATTERNS", "add_push_parser", "check_remote_code", "push_rxt_to_hub", "save_hub_ready"]

# Files of a model directory that belong in a Hub repository. Trainer leftovers (trainer_state.json,
# training_args.bin, optimizer/scheduler/RNG states, checkpoint-* folders) and stage-only heads saved by the
# stage trainers (e.g. mlm_head.safetensors) are deliberately not uploaded.
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
CARD_FILES = ("README.md", "LICENSE", STAGES_FILE)
HUB_FILE_PATTERNS = WEIGHT_PATTERNS + CONFIG_FILES + ("*.py",) + TOKENIZER_FILES + CARD_FILES

GatedMode = Literal["auto", "manual", False, None]
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


# ============================================================================================== checks
def _check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("push needs a repo_id: the Hub repository to create or update, e.g. 'my-org/RxT-Alpha-Tiny'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo_id {repo_id!r}: {error}") from error
    return repo_id


def _check_gated(gated: GatedMode) -> GatedMode:
    if gated not in ("auto", "manual", False, None):
        raise ValueError(f"gated={gated!r}; expected 'auto' (RAML acceptance approves access at once), 'manual', "
                         "False (not gated: only for models that are not under RAML) or None (leave the setting)")
    return gated


def _resolve_token(token: Optional[str]) -> str:
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=..., set the HF_TOKEN environment variable or run "
                         "`hf auth login` (the token needs write access to the target namespace)")
    return token


def check_remote_code(model_dir: Union[str, os.PathLike]) -> None:
    """Raise if `model_dir` would not load with `trust_remote_code=True` (auto_map or code files missing)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: save the model with model.save_pretrained(dir)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "rxt":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model, not an RxT model ('rxt')")
    auto_map = config.get("auto_map") or {}
    missing_auto = [k for k in ("AutoConfig", "AutoModelForCausalLM") if k not in auto_map]
    if missing_auto:
        raise ValueError(f"{config_path}: auto_map lacks {missing_auto}; re-save with model.save_pretrained(dir), "
                         "which writes auto_map and copies the modelling code")
    pending = [ref.split(".")[0] for ref in auto_map.values()]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = model_dir / f"{module}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} lacks {module}.py, needed by trust_remote_code loading; re-save "
                                    "with model.save_pretrained(dir), which copies the modelling code")
        pending += _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (or shard index); save the model with "
                                "model.save_pretrained(dir)")


def _hub_files(model_dir: Path) -> dict[str, Path]:
    """Top-level files of `model_dir` that belong in the Hub repository (see HUB_FILE_PATTERNS)."""
    files = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in HUB_FILE_PATTERNS):
            files[path.name] = path
    return files


# ============================================================================================== local
def _write_card_files(out_dir: Path, card: ModelCard, stages: Optional[list], model_name: str) -> None:
    card.save(str(out_dir / "README.md"))
    (out_dir / "LICENSE").write_text(license_pointer_text(model_name), encoding="utf-8")
    if stages:
        (out_dir / STAGES_FILE).write_text(json.dumps(list(stages), indent=2) + "\n", encoding="utf-8")


def _card_for(model: Any, card: Union[ModelCard, str, os.PathLike, None], tokenizer: Any,
              card_kwargs: dict) -> tuple[ModelCard, Optional[list]]:
    """The card to publish (given and validated, or built) and the stage records it was built from."""
    if card is not None:
        return validate_model_card(card if isinstance(card, ModelCard) else ModelCard.load(str(card))), \
            card_kwargs.get("stages")
    stages = card_kwargs.pop("stages", None)
    if stages is None:
        source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "") or ""
        stages = load_training_stages(source) if source and Path(source).is_dir() else []
    stages = list(stages)
    return build_model_card(model, tokenizer=tokenizer, stages=stages, **card_kwargs), stages


def save_hub_ready(model: Any, out_dir: Union[str, os.PathLike], tokenizer: Any = None, *,
                   card: Union[ModelCard, str, os.PathLike, None] = None, max_shard_size: Union[int, str] = "5GB",
                   **card_kwargs: Any) -> Path:
    """Write a complete, Hub-ready RxT repository into `out_dir` (nothing is uploaded).

    Contents: weights, `config.json` with `auto_map`, the modelling code files, the tokenizer (if given),
    `README.md` (RAML v1.0 card), a `LICENSE` pointer and `rxt_training_stages.json` (when stages are known).
    The directory loads offline with `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`.

    Args:
        model: an `RxTForConversationalGeneration`.
        out_dir: the directory to write (created if needed).
        tokenizer: saved next to the model when given.
        card: a ready card (object or README path) to use instead of building one; it must pass
            :func:`~transformers_rxt.hub.validate_model_card`.
        max_shard_size: passed to `save_pretrained`.
        **card_kwargs: :func:`~transformers_rxt.hub.build_model_card` arguments (`repo_id`, `stages`,
            `eval_results`, `datasets`, `language`, `base_model`, ...).
    """
    if not hasattr(model, "save_pretrained") or getattr(getattr(model, "config", None), "model_type", None) != "rxt":
        raise TypeError("save_hub_ready expects an RxT model (RxTForConversationalGeneration), "
                        f"got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build the card first: a bad stage record or an invalid custom card fails before anything is written.
    card_obj, stages = _card_for(model, card, tokenizer, dict(card_kwargs))
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    name = card_kwargs.get("model_name") or (card_kwargs.get("repo_id") or "").split("/")[-1] or "this model"
    _write_card_files(out_dir, card_obj, stages, name)
    check_remote_code(out_dir)
    return out_dir


# ============================================================================================== push
def push_rxt_to_hub(
    model_dir_or_model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: Optional[bool] = True,
    gated: GatedMode = "auto",
    token: Optional[str] = None,
    commit_message: str = "Upload RxT model (RAML v1.0)",
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    card: Union[ModelCard, str, os.PathLike, None] = None,
    endpoint: Optional[str] = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """Upload an RxT model as a gated RAML v1.0 repository: weights, config with `auto_map`, code, tokenizer, card.

    Order of operations: check the inputs (repo id, token, directory contents, card) before any request;
    create the repository (`private` applies only when it is new); switch gating on; then upload everything
    in a single commit. A failure at any step raises and leaves nothing half-gated.

    Args:
        model_dir_or_model: an `RxTForConversationalGeneration`, or a directory written by `save_pretrained`
            (or a trainer). From a directory, only Hub files are uploaded (weights, configs, code, tokenizer);
            trainer state, optimizer states and `checkpoint-*` folders are left out. The card is always
            (re)built from the config, unless `card` is given.
        repo_id: `namespace/name` (a bare name goes to the token owner's namespace).
        tokenizer: uploaded with the model (from a directory, tokenizer files already there are uploaded too).
        private: visibility of a newly created repository (default private).
        gated: "auto" (default: access is granted as soon as the RAML form is accepted), "manual", False, or
            None to leave the repository's setting unchanged.
        token: a write token (default: `HF_TOKEN` or the stored login). Missing -> `ValueError`.
        commit_message, commit_description, revision, create_pr: as for `HfApi.create_commit`.
        max_shard_size: for `save_pretrained` when a model object is given.
        card: a custom card (object or README path); it must pass `validate_model_card`.
        endpoint: a Hub endpoint other than `HF_ENDPOINT` / huggingface.co (tests, private Hub mirrors).
        **card_kwargs: :func:`~transformers_rxt.hub.build_model_card` arguments (`stages`, `eval_results`,
            `datasets`, `language`, `base_model`, `model_name`, `description`, `tags`, ...).

    Returns:
        the `CommitInfo` of the upload commit.
    """
    repo_id = _check_repo_id(repo_id)
    gated = _check_gated(gated)
    token = _resolve_token(token)
    if "repo_id" in card_kwargs:
        raise TypeError("pass repo_id once, as the second argument")
    source_dir = None
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        source_dir = Path(model_dir_or_model)
        if not source_dir.is_dir():
            raise FileNotFoundError(f"model directory {source_dir} does not exist")
        check_remote_code(source_dir)
    elif getattr(getattr(model_dir_or_model, "config", None), "model_type", None) != "rxt":
        raise TypeError("push_rxt_to_hub expects an RxT model or a directory saved from one, "
                        f"got {type(model_dir_or_model).__name__}")
    if card is not None:  # fail before any request
        card = validate_model_card(card if isinstance(card, ModelCard) else ModelCard.load(str(card)))

    from .. import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="transformers-rxt", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if gated is not None:
        api.update_repo_settings(repo_id, gated=gated)

    with tempfile.TemporaryDirectory(prefix="rxt-push-") as staging:
        staging = Path(staging)
        card_kwargs = dict(card_kwargs, repo_id=repo_id)
        if source_dir is None:
            save_hub_ready(model_dir_or_model, staging, tokenizer, card=card, max_shard_size=max_shard_size,
                           **card_kwargs)
            files = _hub_files(staging)
        else:
            files = _hub_files(source_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
                files.update({n: p for n, p in _hub_files(staging).items() if n in TOKENIZER_FILES})
            card_obj, stages = _card_for(str(source_dir), card, tokenizer, card_kwargs)
            name = card_kwargs.get("model_name") or repo_id.split("/")[-1]
            _write_card_files(staging, card_obj, stages, name)
            files.update({n: staging / n for n in CARD_FILES if (staging / n).is_file()})
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in sorted(files.items())]
        return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload RxT model (RAML v1.0)",
                                 commit_description=commit_description, revision=revision, create_pr=create_pr)


# ============================================================================================== command line
# `rxt push`'s options live with the other commands' in transformers_rxt_cli (`add_push_parser`, importing only
# argparse, so `rxt push --help` answers at once); the command itself is `_push_command` below.


def _read_json(path: Optional[str]) -> Any:
    return None if path is None else json.loads(Path(path).read_text(encoding="utf-8"))


def _push_command(args: Any) -> int:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    eval_results = _read_json(args.eval_results)
    info = push_rxt_to_hub(
        args.model_dir, args.repo_id, tokenizer=tokenizer, private=not args.public,
        gated=None if args.gated == "keep" else args.gated, token=args.token, commit_message=args.commit_message,
        endpoint=args.endpoint, stages=_read_json(args.stages), eval_results=eval_results,
        datasets=args.dataset, language=args.language or ("en",), base_model=args.base_model,
    )
    print(f"pushed {args.model_dir} -> {info.commit_url} (RAML v1.0 card, gated: {args.gated})")
    return 0
