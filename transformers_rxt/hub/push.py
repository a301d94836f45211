"""Publishing RxT models on the Hugging Face Hub: one push path, gated under RAML v1.0, model files only.

Every push of this package goes through :func:`push_rxt_to_hub`: `rxt push`, `model.push_to_hub`, and the stage
trainers' `push_to_hub` (:class:`~transformers_rxt.hub.RxTHubTrainerMixin`). In order, it

1. checks the request locally: repository id, token, model files, and the gating mode. RxT models are published
   under RAML v1.0 behind its access form, so an ungated request (`gated=False`) is refused;
2. writes and validates the RAML v1.0 card (`README.md`), whose access form describes the gating mode, and the
   `LICENSE` pointer;
3. creates the repository (private unless asked otherwise) and sets its gating (`update_repo_settings`),
   before any file is uploaded (:func:`open_gated_repo`, also what a trainer's `init_hf_repo` calls);
4. uploads, in one commit, only the model's own files:

   * the weights (`model.safetensors`, or the index and the shards it names), `config.json` (with `auto_map`)
     and `generation_config.json`;
   * the model's code: the modules its `auto_map` names and the sibling modules they import, so that
     `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works without this package;
   * the tokenizer files;
   * the card, the licence pointer and `rxt_training_stages.json` (the stage history).

   Anything else in the model directory (trainer state, optimizer states, `checkpoint-*` folders, stage-only
   heads, stray scripts or notes) is listed in a warning and left out.

`gated=None` (`rxt push --gated keep`) keeps the mode an existing repository already has. A new repository,
or one that is not gated, has no gating to keep: the request is refused and names the fix (`gated="auto"` or
`"manual"`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.utils import logging
from transformers_rxt_cli import add_push_parser  # noqa: F401  (re-exported: `rxt push`'s options)

from .cards import STAGES_FILE, build_model_card, license_pointer_text, load_training_stages, validate_model_card

logger = logging.get_logger(__name__)

__all__ = ["add_push_parser", "check_remote_code", "open_gated_repo", "push_rxt_to_hub", "save_hub_ready"]

# The allow-list of a published repository (plus the model's code files and the shards a weight index names).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
# Written by the push itself; copies of these in a model directory are replaced, never uploaded as they are.
CARD_FILES = ("README.md", "LICENSE", STAGES_FILE)

# "auto" or "manual"; None keeps the mode of an existing gated repository. False (ungated) is refused.
GatedMode = Optional[Literal["auto", "manual"]]
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


# ============================================================================================== checks
def _check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("push needs a repo_id: the Hub repository to create or update, e.g. 'my-org/RxT-Alpha-Tiny'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo_id {repo_id!r}: {error}") from error
    if "/" not in repo_id:  # the card names the repository, so the namespace must be known before any request
        raise ValueError(f"repo_id {repo_id!r} has no namespace: pass 'your-name/{repo_id}' or 'your-org/{repo_id}'")
    return repo_id


def _check_gated(gated: Any) -> GatedMode:
    if gated is False:
        raise ValueError("gated=False would publish an RxT model without the RAML v1.0 access form; RxT models are "
                         "published gated (a private repository is gated as well). Pass gated='auto' (access is "
                         "granted on accepting the licence) or gated='manual' (you review each request)")
    if gated not in ("auto", "manual", None):
        raise ValueError(f"gated={gated!r}; expected 'auto' (access is granted on accepting the licence), 'manual' "
                         "(you review each request) or None (keep the gating of an existing gated repository)")
    return gated


def _resolve_token(token: Optional[str]) -> str:
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=..., set the HF_TOKEN environment variable or run "
                         "`hf auth login` (the token needs write access to the target namespace)")
    return token


def _auto_map_modules(model_dir: Path) -> list[str]:
    """Modules named by the `auto_map` of `config.json` and `tokenizer_config.json` (code of this repository only)."""
    modules = []
    for name in ("config.json", "tokenizer_config.json"):
        path = model_dir / name
        auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") if path.is_file() else None
        for refs in (auto_map or {}).values():
            for ref in refs if isinstance(refs, list) else [refs]:
                if ref and "--" not in ref:  # "other/repo--module.Class" points at another repository's code
                    modules.append(ref.split(".")[0])
    return modules


def _code_files(model_dir: Path) -> list[str]:
    """The model's own code files: the modules its `auto_map` names and, transitively, the siblings they import."""
    pending, found = _auto_map_modules(model_dir), []
    while pending:
        name = f"{pending.pop()}.py"
        if name in found:
            continue
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} lacks {name}, needed by trust_remote_code loading; re-save "
                                    "with model.save_pretrained(dir), which copies the modelling code")
        found.append(name)
        pending += _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))
    return sorted(found)


def check_remote_code(model_dir: Union[str, os.PathLike]) -> None:
    """Raise if `model_dir` would not load with `trust_remote_code=True` (auto_map or code files missing)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: save the model with model.save_pretrained(dir)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "rxt":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model, not an RxT model ('rxt')")
    missing_auto = [k for k in ("AutoConfig", "AutoModelForCausalLM") if k not in (config.get("auto_map") or {})]
    if missing_auto:
        raise ValueError(f"{config_path}: auto_map lacks {missing_auto}; re-save with model.save_pretrained(dir), "
                         "which writes auto_map and copies the modelling code")
    _code_files(model_dir)
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (or shard index); save the model with "
                                "model.save_pretrained(dir)")


def _weight_files(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return {index.name, *shards}
    return {"model.safetensors"}


def _select_hub_files(model_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The allow-listed files of `model_dir` (name -> path) and the names of everything else there."""
    allowed = {*CONFIG_FILES, *TOKENIZER_FILES, *_code_files(model_dir), *_weight_files(model_dir)}
    files, left_out = {}, []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name in allowed:
            files[path.name] = path
        elif path.name not in CARD_FILES:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return files, left_out


# ============================================================================================== local
def _load_card(card: Union[ModelCard, str, os.PathLike]) -> ModelCard:
    return card if isinstance(card, ModelCard) else ModelCard.load(str(card))


def _write_card_files(out_dir: Path, card: ModelCard, stages: Optional[list], model_name: str) -> None:
    card.save(str(out_dir / "README.md"))
    (out_dir / "LICENSE").write_text(license_pointer_text(model_name), encoding="utf-8")
    if stages:
        (out_dir / STAGES_FILE).write_text(json.dumps(list(stages), indent=2) + "\n", encoding="utf-8")


def _card_for(model: Any, card: Union[ModelCard, str, os.PathLike, None], tokenizer: Any, gated: str,
              card_kwargs: dict) -> tuple[ModelCard, list]:
    """The card to publish (given and validated, or built) and the stage records that go with it."""
    stages = card_kwargs.pop("stages", None)
    if stages is None:
        source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "") or ""
        stages = load_training_stages(source) if source and Path(source).is_dir() else []
    stages = list(stages)
    if card is not None:
        return validate_model_card(_load_card(card), gated=gated), stages
    return build_model_card(model, tokenizer=tokenizer, stages=stages, gated=gated, **card_kwargs), stages


def save_hub_ready(model: Any, out_dir: Union[str, os.PathLike], tokenizer: Any = None, *,
                   card: Union[ModelCard, str, os.PathLike, None] = None, max_shard_size: Union[int, str] = "5GB",
                   gated: str = "auto", **card_kwargs: Any) -> Path:
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
        gated: the gating mode the card's access form describes, "auto" or "manual".
        **card_kwargs: :func:`~transformers_rxt.hub.build_model_card` arguments (`repo_id`, `stages`,
            `eval_results`, `datasets`, `language`, `base_model`, ...).
    """
    if not hasattr(model, "save_pretrained") or getattr(getattr(model, "config", None), "model_type", None) != "rxt":
        raise TypeError("save_hub_ready expects an RxT model (RxTForConversationalGeneration), "
                        f"got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build the card first: a bad stage record or an invalid custom card fails before anything is written.
    card_obj, stages = _card_for(model, card, tokenizer, gated, dict(card_kwargs))
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    name = card_kwargs.get("model_name") or (card_kwargs.get("repo_id") or "").split("/")[-1] or "this model"
    _write_card_files(out_dir, card_obj, stages, name)
    check_remote_code(out_dir)
    return out_dir


# ============================================================================================== repository
def hub_api(token: Optional[str] = None, endpoint: Optional[str] = None) -> HfApi:
    """The `HfApi` client of this package's pushes (its user agent names transformers-rxt)."""
    from .. import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="transformers-rxt", library_version=__version__)


def resolve_gating(api: HfApi, repo_id: str, gated: GatedMode) -> str:
    """The gating mode `repo_id` will have: `gated`, or for None the mode the existing repository already has.

    Raises `ValueError` for None when the repository does not exist or is not gated: there is no gating to keep.
    """
    gated = _check_gated(gated)
    if gated is not None:
        return gated
    try:
        current = api.model_info(repo_id).gated
    except RepositoryNotFoundError:
        raise ValueError(f"gated=None (--gated keep) keeps the gating of an existing repository, but {repo_id} does "
                         "not exist yet and a new repository has no gating to keep; pass gated='auto' or "
                         "'manual' (--gated auto|manual)") from None
    if current not in ("auto", "manual"):
        raise ValueError(f"{repo_id} is not gated on the Hub, so gated=None (--gated keep) would publish an RxT model "
                         "without the RAML v1.0 access form; pass gated='auto' or 'manual' (--gated auto|manual)")
    return current


def open_gated_repo(api: HfApi, repo_id: str, *, private: Optional[bool], gated: GatedMode) -> str:
    """Create `repo_id` if needed (`private` applies to a new repository) and gate it; return its full id.

    The only way this package creates a repository, so that no file can reach one before it is gated.
    `gated` as in :func:`resolve_gating` (None keeps an existing repository's mode, and is refused otherwise).
    """
    mode = resolve_gating(api, repo_id, gated)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.update_repo_settings(repo_id, gated=mode)
    return repo_id


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

    Order of operations (see the module docstring): local checks and the validated card first; then the
    repository is created and gated; then the allow-listed files are uploaded in a single commit. Files of a
    model directory outside the allow-list are listed in a warning and not uploaded.

    Args:
        model_dir_or_model: an `RxTForConversationalGeneration`, or a directory written by `save_pretrained`
            (or a trainer). The card is always (re)built from the config, unless `card` is given.
        repo_id: `namespace/name`.
        tokenizer: uploaded with the model (from a directory, tokenizer files already there are uploaded too).
        private: visibility of a newly created repository (default private); either way it is gated.
        gated: "auto" (default: access is granted as soon as the RAML form is accepted), "manual", or None to
            keep the mode of an existing gated repository. False (ungated) is refused.
        token: a write token (default: `HF_TOKEN` or the stored login). Missing -> `ValueError`.
        commit_message, commit_description, revision, create_pr: as for `HfApi.create_commit`.
        max_shard_size: for `save_pretrained` when a model object is given.
        card: a custom card (object or README path); it must pass `validate_model_card(card, gated=mode)`.
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
        raise TypeError("push_rxt_to_hub expects an RxT model (RxTForConversationalGeneration) or a directory "
                        f"saved from one, got {type(model_dir_or_model).__name__}")
    if card is not None:  # fail before any request
        card = validate_model_card(_load_card(card))

    api = hub_api(token, endpoint)
    mode = resolve_gating(api, repo_id, gated)  # a request only for gated=None
    card_kwargs = dict(card_kwargs, repo_id=repo_id)
    with tempfile.TemporaryDirectory(prefix="rxt-push-") as staging:
        staging = Path(staging)
        if source_dir is None:
            save_hub_ready(model_dir_or_model, staging, tokenizer, card=card, max_shard_size=max_shard_size,
                           gated=mode, **card_kwargs)
        else:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            card_obj, stages = _card_for(str(source_dir), card, tokenizer, mode, card_kwargs)
            _write_card_files(staging, card_obj, stages, card_kwargs.get("model_name") or repo_id.split("/")[-1])
        validate_model_card(staging / "README.md", gated=mode)  # the card that goes up, with the mode it states
        files, left_out = _select_hub_files(source_dir or staging)
        files.update({p.name: p for p in staging.iterdir() if p.name in CARD_FILES + TOKENIZER_FILES})
        if left_out:
            logger.warning(f"Not uploaded to {repo_id} (not part of the model): {', '.join(left_out)}")

        repo_id = open_gated_repo(api, repo_id, private=private, gated=mode)
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
