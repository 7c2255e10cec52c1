"""Datasets by Hugging Face Hub repo id: ``--dataset lerobot/pusht`` or ``lerobot/pusht@v3.0``.

A dataset argument (``damvla train --dataset``, ``damvla data check``) is a local folder whenever that path
exists. Otherwise, when it reads ``namespace/name[@revision]``, huggingface_hub downloads the dataset repo
(``snapshot_download(repo_type="dataset")``) into its standard cache and its snapshot folder is read like any
local folder. The revision is a branch, tag or commit hash (default ``main``).

huggingface_hub's environment applies: ``HF_HUB_CACHE`` / ``HF_HOME`` (where the cache lives, default
``~/.cache/huggingface/hub``), ``HF_TOKEN`` (private or gated datasets), ``HF_ENDPOINT`` (a mirror) and
``HF_HUB_OFFLINE=1`` (never touch the network: the cached snapshot is used, or the command fails saying so).
Without ``HF_HUB_OFFLINE``, an unreachable hub also falls back to the cached snapshot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from damvla.data.lerobot import DatasetError

# namespace/name, then optionally @revision (branches may hold slashes: refs/pr/1, feature/x).
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>\S+))?")


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``spec`` reads ``namespace/name[@revision]``, else ``None``."""
    m = REPO_ID.fullmatch(str(spec))
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return m["repo"], m["rev"]


def resolve_dataset(spec: str | Path, log: Callable[[str], None] | None = print) -> Path:
    """The local folder holding dataset ``spec``: the path itself when it exists (a local folder always
    wins), else the snapshot of the Hub dataset ``namespace/name[@revision]``, downloaded into the
    Hugging Face cache when not there yet. A ``spec`` that is neither comes back unchanged, so the reader
    reports the missing folder. Raises ``DatasetError`` (one line: what is wrong and what to do) when the
    Hub has no such dataset or revision, or when it cannot be reached (or ``HF_HUB_OFFLINE=1``) and the
    dataset is not cached. ``log`` gets one line naming the commit and folder used."""
    path = Path(spec).expanduser()
    parsed = None if path.exists() else parse_repo_id(str(spec))
    if parsed is None:
        return path
    repo_id, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    name = f"{repo_id}@{rev}"
    hub = constants.ENDPOINT
    cache = constants.HF_HUB_CACHE
    offline = constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except RevisionNotFoundError:
        raise DatasetError(
            f"{spec}: the Hugging Face dataset {repo_id!r} ({hub}) has no revision {rev!r}; give a branch, tag or "
            "commit hash after '@' (LeRobot tags each dataset with its format version, e.g. @v3.0)"
        ) from None
    except RepositoryNotFoundError:
        raise DatasetError(
            f"{spec}: no such folder, and the Hugging Face Hub ({hub}) has no dataset {repo_id!r} (a private or "
            "gated one needs a token: `hf auth login` or HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError as e:
        if "incomplete" in str(e).lower():  # IncompleteSnapshotError (huggingface_hub >= 1.x)
            what = f"its cached copy in {cache} is incomplete (an interrupted download)"
        else:
            what = f"it is not in the Hugging Face cache ({cache})"
        if offline:
            raise DatasetError(
                f"{spec}: no such folder, and HF_HUB_OFFLINE=1 while dataset {name} cannot be used offline: {what}. "
                f"Download it once with network access (without HF_HUB_OFFLINE, e.g. `damvla data check {spec}`), "
                "or pass a local dataset folder"
            ) from None
        cause = e.__cause__ or e.__context__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
        raise DatasetError(
            f"{spec}: no such folder; the Hugging Face Hub ({hub}) could not be reached ({reason}) and dataset "
            f"{name} cannot be used offline: {what}. Check the network (or HF_ENDPOINT), or pass a local dataset folder"
        ) from None
    except HfHubHTTPError as e:
        raise DatasetError(f"{spec}: downloading dataset {name} from {hub} failed: {str(e).splitlines()[0]}") from None
    info = folder / "meta" / "info.json"
    version = str(json.loads(info.read_text()).get("codebase_version", "")) if info.is_file() else "v3"
    if not version.startswith("v3"):
        raise DatasetError(
            f"{spec}: commit {folder.name[:12]} holds a LeRobot {version} dataset and damvla reads v3.x: pick a "
            f"revision in that format (LeRobot tags them, e.g. {repo_id}@v3.0) or convert it with LeRobot's "
            "v2.1 -> v3.0 script"
        )
    if log is not None:
        log(f"dataset {name}: commit {folder.name[:12]}, {folder}" + (" (HF_HUB_OFFLINE=1: from the cache)" if offline else ""))
    return folder
