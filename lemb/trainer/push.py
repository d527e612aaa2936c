"""`lemb push`: a trained model folder and its model card to the Hugging Face Hub.

The folder goes up as it is, through huggingface_hub's `create_repo` and `upload_folder`
(`SentenceTransformer.push_to_hub` would save the model again and write a card of its own over lemb's). Before
anything is sent, the card is written again with the repo's id, so that its usage example loads the model from where
it now lives. The token is huggingface_hub's: `HF_TOKEN`, else the one `hf auth login` stored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lemb
from lemb.errors import LembError
from lemb.trainer.card import read_facts, write_card
from lemb.trainer.export import model_folder

log = logging.getLogger(__name__)
HIDDEN = [".*", "*/.*"]  # a killed writer's temporary files (`.NAME.tmp-PID`) stay home


def check_repo(repo: str) -> str:
    """`repo` as the Hub takes it, OWNER/NAME (huggingface_hub's own rules), or one line saying what is wrong."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise LembError(f"--repo {repo!r}: not a Hugging Face repo id ({_first_line(exc)})") from None
    if repo.count("/") != 1:
        raise LembError(f"--repo {repo!r}: give the owner too, as OWNER/NAME (your user name or an organization)")
    return repo


def model_to_push(path: Path) -> Path:
    """The model folder of `path` (a run or a model folder), or one line where it holds no model or no card that lemb
    wrote."""
    folder = model_folder(Path(path))
    if read_facts(folder) is None:
        raise LembError(f"{folder}: no model card written by lemb (README.md with `lemb` metadata); lemb writes one "
                        "with every model it trains or exports")  # fmt: skip
    adapter = folder / "adapter_config.json"
    if adapter.exists():  # LoRA adapters name their base; a folder on this machine means nothing on the Hub
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        if Path(base).is_absolute() or Path(base).exists():
            raise LembError(f"{folder}: LoRA adapters over the local base {base}, which no one can load from the Hub: "
                            "train with --merge and push <run>/train/model-merged (the full model)")  # fmt: skip
    return folder


def load_finished(folder: Path) -> Any:
    """The model in `folder`, or one line where it does not load (a folder half copied, weights missing)."""
    from lemb.stages.encoder import load_embedder

    try:
        model = load_embedder(str(folder), max_length=None)
    except Exception as exc:  # whatever the folder lacks, sentence-transformers says it in its own words
        raise LembError(f"{folder}: not a finished model ({type(exc).__name__}: {_first_line(exc)})") from None
    return model


def push(path: Path, repo: str, private: bool = False, revision: str | None = None) -> tuple[Path, str]:
    """Upload the model folder of `path` and its card to `repo` (created if missing; `private` applies to a repo
    created now), on `revision` (a branch, created if missing; default main). Returns the folder and the commit URL."""
    from huggingface_hub import HfApi, get_token

    repo = check_repo(repo)
    folder = model_to_push(path)
    token = get_token()
    if not token:
        raise LembError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    write_card(folder, repo=repo, model=load_finished(folder))
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo, folder_path=folder, revision=revision, ignore_patterns=HIDDEN,
            commit_message=f"lemb {lemb.__version__}: upload {folder.name}",
        )  # fmt: skip
    except _upload_errors() as exc:
        raise LembError(f"push to {repo} failed: {_reason(exc)} (endpoint {api.endpoint})") from None
    return folder, str(getattr(commit, "commit_url", commit))


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What a refused or unreachable upload raises. huggingface_hub's HTTP errors, its offline mode and a file gone
    while sending are OSErrors; a refused connection or a timeout is an error of the HTTP library it sends with
    (httpx2, httpx or requests, by release), which its HfHubHTTPError derives from."""
    from huggingface_hub.errors import HfHubHTTPError

    library = [c for c in HfHubHTTPError.__mro__ if c.__module__.split(".")[0] not in ("huggingface_hub", "builtins")]
    return (OSError, *library)


def _reason(exc: BaseException) -> str:
    """The status and what the Hub said (its error message's first line may say only the status), else the first
    line of the error."""
    said = " ".join(str(getattr(exc, "server_message", None) or "").split())
    return f"{_first_line(exc).split(':', 1)[0]}: {said}" if said else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
