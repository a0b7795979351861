"""Where a checkpoint argument points: a local path, or a file on the Hugging Face Hub.

`hf://ORG/REPO/PATH` (or `hf://ORG/REPO@REVISION/PATH`) is fetched with `huggingface_hub.hf_hub_download`,
so the user's cache (HF_HOME, HF_HUB_CACHE), offline mode (HF_HUB_OFFLINE) and token apply. What comes back
is the cached file's local path, read and checked like any other file. huggingface_hub is the optional `hf`
extra, imported only when such a source is used.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from ..errors import CheckpointError, SLA2Error, UsageError

HUB_SCHEME = "hf://"


def is_hub_source(text) -> bool:
    return str(text).startswith(HUB_SCHEME)


def parse_hub_source(text: str) -> tuple[str, str, str | None]:
    """(repo id, file in the repo, revision or None) of `hf://ORG/REPO[@REVISION]/PATH`. A revision with a
    slash (`refs/pr/1`) is written URL-encoded (`refs%2Fpr%2F1`), as in huggingface_hub's own hf:// paths."""
    org, _, rest = text.removeprefix(HUB_SCHEME).partition("/")
    repo, _, filename = rest.partition("/")
    repo, at, revision = repo.partition("@")
    if not (org and repo and filename) or (at and not revision):
        raise UsageError(f"{text} is not a Hub source; write hf://ORG/REPO/PATH or hf://ORG/REPO@REVISION/PATH")
    return f"{org}/{repo}", filename, unquote(revision) if at else None


def resolve_source(text) -> Path:
    """`text` as a local file: itself, or for an hf:// source its file in the Hugging Face cache (downloaded
    there first unless cached). Every failure of the download is one CheckpointError sentence."""
    if not is_hub_source(text):
        return Path(text)
    repo_id, filename, revision = parse_hub_source(text)
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.utils import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise SLA2Error(f'{text}: reading from the Hugging Face Hub needs huggingface_hub; pip install '
                        '"sla2cli[hf]"') from None
    at = revision or "main"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise CheckpointError(f"{text} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}") from None
    except RepositoryNotFoundError:  # gated repositories too
        raise CheckpointError(f"{text}: repository {repo_id} not found on the Hub, or it is private or gated and "
                              "your token (HF_TOKEN or `hf auth login`) does not grant access") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{text}: revision {at} not found in {repo_id}") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{text}: {filename} not found in {repo_id} at {at}") from None
    except (OSError, ValueError) as exc:  # HTTP and network failures, a malformed repo id or file name
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot fetch {text} ({reason})") from None
