"""Checkpoint folders, written so that a crash at any moment leaves the previous one usable.

    OUT/checkpoints/step-0000100/    config.json  model.safetensors  normalization.json  metadata.json
                                     (the policy, loadable by DAMVLAPolicy.from_pretrained)
                                     train_config.json (RunConfig)   training_state.pt
    OUT/checkpoints/latest           "step-0000100"

A checkpoint is written into ``.tmp-step-...`` (files fsynced), then renamed into place (``os.replace``,
atomic on POSIX); only then is ``latest`` replaced (write temp file, fsync, rename). A folder without
every file is never the target of ``latest`` and is ignored when looking for one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from damvla.atomic import fsync_dir
from damvla.model.policy import CHECKPOINT_FILES

STATE_FILE = "training_state.pt"
RUN_CONFIG_FILE = "train_config.json"
LATEST = "latest"
REQUIRED = CHECKPOINT_FILES + (STATE_FILE, RUN_CONFIG_FILE)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED)


class NoSpaceLeft(OSError):
    """The disk filled up while a checkpoint was written (its temp folder has been removed)."""


# How torch.save reports a failed write of its zip archive (it hides the ENOSPC behind these).
_TORCH_WRITE_FAILURES = ("unexpected pos", "inline_container", "failed writing", "file write failed")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict / list (a checkpoint's size, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def remove_stale_temp(ckpt_root: Path) -> list[Path]:
    """Remove the ``.tmp-step-*`` folders that interrupted writes left (call before this process writes);
    they hold the space the next checkpoint needs. Returns the removed folders."""
    stale = sorted(ckpt_root.glob(".tmp-step-*")) if ckpt_root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(ckpt_root: Path, step: int, write_files: Callable[[Path], None], keep_last: int,
                     size_hint: int | None = None) -> Path:  # fmt: skip
    """Create ``ckpt_root/step-XXXXXXX`` atomically: ``write_files(tmp_dir)`` fills a temp folder, which
    is renamed into place; then ``latest`` is updated and all but the newest ``keep_last`` are removed.

    A failed write removes the temp folder (else it keeps the disk full and the next try fails too); a full
    disk raises ``NoSpaceLeft`` with the space needed: the previous checkpoint's size, else ``size_hint``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    tmp = ckpt_root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write_files(tmp)
        missing = [f for f in REQUIRED if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint writer left out {missing} in {tmp}")
        _fsync_tree(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_disk_full(e):
            raise
        previous = list_checkpoints(ckpt_root)
        need = _folder_bytes(previous[-1]) if previous else size_hint
        need_s = f"~{need / 2**20:.0f} MB" if need is not None else "an unknown amount"
        free = shutil.disk_usage(ckpt_root).free / 2**20
        raise NoSpaceLeft(
            errno.ENOSPC,
            f"no space left on {ckpt_root}: the checkpoint needs {need_s} ({free:.0f} MB free); "
            f"step {step} was not saved. Free some space, then resume with --resume {ckpt_root.parent} ({e})",
        ) from e
    if final.exists():  # the same step saved again (e.g. a resumed run ending where it started)
        old = ckpt_root / f".old-{step_name(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_root)
    _write_latest(ckpt_root, final.name)
    prune(ckpt_root, keep_last)
    return final


def _write_latest(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / LATEST)
    fsync_dir(ckpt_root)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if is_complete(p))


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints (never the ``latest`` one) and any
    temp folders left by crashed writes."""
    keep = set(p.name for p in list_checkpoints(ckpt_root)[-keep_last:])
    latest = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).is_file() else None
    for p in list_checkpoints(ckpt_root):
        if p.name not in keep and p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
    for p in list(ckpt_root.glob(".tmp-step-*")) + list(ckpt_root.glob(".old-step-*")):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint folder, a run folder (OUT) or its ``checkpoints/`` folder -> the checkpoint
    to resume from: the one ``latest`` names, else the newest complete one."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.is_dir() and p.name.startswith("step-"):
        missing = [f for f in REQUIRED if not (p / f).is_file()]
        raise FileNotFoundError(f"checkpoint {p} is incomplete: lacks {missing}")
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not root.is_dir():
        raise FileNotFoundError(f"--resume {p}: no such run or checkpoint folder")
    latest = root / LATEST
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if is_complete(cand):
            return cand
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"--resume {p}: no complete checkpoint under {root}")
    return found[-1]


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_state(ckpt: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG states (numpy / python tuples) we wrote ourselves.
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
