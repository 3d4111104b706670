"""`cmoe push`: a finished artifact (carved, exported or fine-tuned) uploaded to the Hugging Face hub with
its recipe and model card. Everything that can be checked on disk is checked before the first request, so
a wrong directory or repository id is refused without touching the network."""

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from cmoe.errors import HUB_ERRORS, CmoeError
from cmoe.io.artifacts import RESUME_DIR
from cmoe.io.model_card import CARD_FILE, model_name
from cmoe.io.recipe_file import RECIPE_FILE, has_recipe, read_recipe

# The names an output has while a command writes it (cmoe.io.artifacts.OutputSlot): never a finished model.
UNFINISHED_SUFFIXES = (".partial", ".scratch", ".old")
# What a writer may leave inside a directory besides the model: locks, atomic-write temporaries, resume state.
UPLOAD_IGNORE = ["*.lock", "*.tmp", "*.partial", "*.scratch", f"{RESUME_DIR}/*", "__pycache__/*", "*.pyc"]


def check_pushable(directory: Path, repo_id: str) -> dict:
    """The artifact's record, once the directory is a finished model cmoe wrote and `repo_id` a hub id."""
    if not directory.is_dir():
        raise CmoeError(f"{directory}: no such model directory")
    if directory.name.endswith(UNFINISHED_SUFFIXES) or (directory / RESUME_DIR).exists():
        raise CmoeError(
            f"{directory}: a partial output (a command is writing it or was interrupted); finish it (--resume) "
            "and push the finished directory"
        )
    if not has_recipe(directory):
        raise CmoeError(f"{directory}: not a model directory written by cmoe (no {RECIPE_FILE})")
    missing = [name for name in ("config.json", CARD_FILE) if not (directory / name).is_file()]
    if not any(directory.glob("*.safetensors")):
        missing.append("safetensors weights")
    if missing:
        raise CmoeError(f"{directory}: not a finished cmoe model (no {', '.join(missing)})")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CmoeError(f"{repo_id}: not a hub repository id, expected OWNER/NAME ({error})") from None
    return read_recipe(directory)


def push_artifact(
    directory: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> dict:
    """Create `repo_id` if it does not exist (`private` applies to a new one only), create the branch
    `revision` if given and missing, and upload the directory in one commit, locks and temporaries left out."""
    directory = Path(directory)
    record = check_pushable(directory, repo_id)
    if revision is not None and not revision.strip():
        raise CmoeError("--revision: give a branch name (or leave it out for main)")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(url.repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=directory,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {model_name(record)} (cmoe)",
            ignore_patterns=UPLOAD_IGNORE,
        )
    except HUB_ERRORS as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise CmoeError(
            f"{repo_id}: the upload failed ({type(error).__name__}: {reason}); check the network and the login "
            "(`hf auth login` or HF_TOKEN)"
        ) from error
    return {
        "directory": str(directory.resolve()),
        "repo_id": url.repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": commit.oid,
        "commit_url": commit.commit_url,
        "ignored": UPLOAD_IGNORE,
    }
