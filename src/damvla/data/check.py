"""`damvla data check DATASET`: validate a LeRobot v3.0 dataset for training and print a report.

DATASET is a folder, or a Hugging Face dataset id ``namespace/name[@revision]`` (``damvla.data.hub``).

The report: episodes, frames, tasks; per action dimension min/max and q01/q99 (and which dimensions are
near-constant, hence normalised to 0); gripper flips per episode; router label balance.

Before the report, what LeRobot's own reader relies on is checked (``damvla.data.integrity``): episode
index ranges contiguous and non-overlapping, rows stored where the ranges say, fps consistent with the
timestamps. With ``--decode`` (default on) every frame of every camera is decoded strictly, so corrupt
videos/images are found here rather than mid-training (compressed video has no checksum: some damage
decodes without any error, see docs/training.md).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from damvla import weighting
from damvla.keys import MAIN_IMAGE_KEY, camera_name
from damvla.normalize import CONSTANT_RANGE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` sub-command (``damvla data check DIR [options]``)."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "check",
        help="validate a dataset and print a report",
        description="Validate a LeRobot v3.0 dataset (a folder, or a Hugging Face dataset id) for training and "
        "print a report: episodes, "
        "frames, tasks, per-dimension action ranges, gripper flips per episode and the router-label "
        "balance. Also checks what LeRobot's reader relies on: contiguous, non-overlapping episode index "
        "ranges and fps consistent with the timestamps. Exits 1 naming the file, episode or field at the "
        "first error.",
    )
    p.add_argument(
        "dir", metavar="DATASET",
        help="LeRobot v3.0 dataset folder (the one holding meta/, data/, videos/), or a Hugging Face dataset id "
        "namespace/name[@revision], downloaded into the Hugging Face cache (HF_HUB_OFFLINE=1: cache only)",
    )
    p.add_argument(
        "--camera",
        default=None,
        help="camera name or feature key (default: 'image', or the dataset's only camera whatever its name)",
    )
    p.add_argument(
        "--gripper-index", type=int, default=None, help='gripper action dimension (default: info["damvla"])'
    )
    p.add_argument("--gripper-threshold", type=float, default=None, help="raw open/closed threshold")
    p.add_argument("--gripper-open", type=float, default=None, help="raw value meaning open (default 1.0)")
    p.add_argument("--phase-key", default=None, help="per-frame column to route on instead of the gripper")
    p.add_argument("--horizon", type=int, default=16, help="action chunk length H the samples are cut to (default 16)")
    p.add_argument(
        "--sigma-lead", type=float, default=6.0,
        help="width in steps of the trajectory weight before each gripper event; sets the router labels (default 6)",
    )
    p.add_argument(
        "--sigma-trail", type=float, default=2.0,
        help="width in steps of the trajectory weight after each gripper event (default 2)",
    )
    p.add_argument(
        "--decode", dest="decode", action="store_true", default=True,
        help="decode every frame of every camera strictly: fail on the first damaged video packet, frame the "
        "decoder flags as corrupt, or PNG whose checksum is wrong (default on)",
    )
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip the full decode (metadata only)")


DEFAULT_CAMERA = MAIN_IMAGE_KEY


def pick_camera(camera_keys: list[str], camera: str | None) -> tuple[str, str | None]:
    """The camera to check, and a finding when it was picked rather than asked for.

    ``camera`` wins when given; else ``image``; else the dataset's only camera, whatever its name. Several
    cameras and none called ``image`` need ``--camera`` (``ValueError`` listing them)."""
    if camera is not None:
        return camera, None
    if DEFAULT_CAMERA in camera_keys:
        return DEFAULT_CAMERA, None
    if len(camera_keys) == 1:
        key = camera_keys[0]
        name = camera_name(key)
        return key, (f"camera {key!r} picked: it is the dataset's only camera (train with the override "
                     f"vision.camera={name})")  # fmt: skip
    if not camera_keys:
        raise ValueError("the dataset has no camera feature (dtype video or image) in meta/info.json")
    raise ValueError(f"the dataset has {len(camera_keys)} cameras {camera_keys} and none is "
                     f"{DEFAULT_CAMERA!r}: choose one with --camera")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Validate ``args.dir`` and print the report; raises ValueError (exit 1 via the CLI) when invalid."""
    from damvla.data.hub import resolve_dataset

    root = resolve_dataset(args.dir)  # a local folder, or a Hub dataset's snapshot in the Hugging Face cache
    from damvla.data import integrity  # torch: only once there is a dataset to read
    from damvla.data.dataset import PolicyDataset
    from damvla.data.lerobot import LeRobotDatasetReader

    findings: list[str] = []
    reader = LeRobotDatasetReader(root)  # raises naming the folder / file that is wrong
    integrity.check_index_ranges(reader)
    integrity.check_timestamps(reader)
    camera, note = pick_camera(reader.camera_keys, args.camera)
    if note:
        findings.append(note)
    ds = PolicyDataset(
        root,
        horizon=args.horizon,
        image_size=8,  # not used for the report; small so --decode caches little
        camera=camera,
        gripper_index=args.gripper_index,
        gripper_threshold=args.gripper_threshold,
        gripper_open=args.gripper_open,
        phase_key=args.phase_key,
        sigma_lead=args.sigma_lead,
        sigma_trail=args.sigma_trail,
        cache_bytes=0,
        progress=True,
        require_routing=False,  # a dataset without a gripper is valid; its missing labels are a finding
    )
    if not ds.has_routing:
        findings.append(
            "no routing labels: no gripper index (--gripper-index, or meta/info.json damvla.gripper_index) and "
            "no --phase-key, so there are no gripper-phase labels; DAM-VLA's router and trajectory weights "
            "need one of the two"
        )
    r = ds.reader
    print(report(ds, findings))
    if args.decode:
        for key in r.camera_keys:
            n = integrity.decode_every_frame(r, key)
            print(f"decoded every frame of {key}: ok ({n} frames, strict)")
    print("dataset OK")
    return 0


def _camera_note(main: str, keys: list[str]) -> str:
    """Which camera a policy reads by default, and how it reads the others (every camera is decoded)."""
    others = [camera_name(k) for k in keys if k != main]
    if not others:
        return f"   training camera: {main}"
    extra = ", ".join(f'"{c}"' for c in others)
    return f"   main camera: {main} (a policy reads the others with vision.extra_cameras='[{extra}]')"


def _fmt(v: float) -> str:
    return f"{v: .4g}"


def report(ds: Any, findings: list[str] | None = None) -> str:
    """The text report of a loaded ``PolicyDataset``, ending with ``findings`` (notes worth reading)."""
    from damvla.data.dataset import feature_names

    r = ds.reader
    lines = [
        f"dataset   {r.root}",
        f"format    LeRobot {r.info.get('codebase_version')}  robot={r.info.get('robot_type')}  fps={r.fps}",
        f"episodes  {ds.num_episodes}    frames {len(ds)}    tasks {len(r.tasks)}",
        f"lengths   min {int(ds._ep_len.min())}  mean {ds._ep_len.mean():.1f}  max {int(ds._ep_len.max())}",
        "cameras   "
        + ", ".join(f"{k} ({r.features[k]['dtype']} {r.features[k]['shape']})" for k in r.camera_keys)
        + _camera_note(ds.camera_key, r.camera_keys),
        "tasks:",
    ]
    counts = np.bincount(ds._task_index, minlength=len(r.tasks))
    for i, t in enumerate(r.tasks[:20]):
        lines.append(f"  [{i}] {counts[i]:>7} frames  {t}")
    if len(r.tasks) > 20:
        lines.append(f"  ... {len(r.tasks) - 20} more")

    st = r.stats[ds.action_key]
    names = feature_names(r.features[ds.action_key], ds.action_dim) or [f"a{j}" for j in range(ds.action_dim)]
    lines.append(f"action {ds.action_key} ({ds.action_dim} dims):")
    lines.append(f"  {'dim':<10}{'min':>11}{'max':>11}{'q01':>11}{'q99':>11}  note")
    n = ds.normalizer
    for j in range(ds.action_dim):
        note = ""
        if ds.gripper is not None and j == ds.gripper.index:
            note = "gripper (binarised, not normalised)"
        elif not n.normalize[j]:
            note = "not normalised"
        elif n.constant[j]:
            note = f"near-constant (q99 - q01 < {CONSTANT_RANGE:g}) -> 0"
        vals = [float(np.asarray(st[k]).reshape(-1)[j]) for k in ("min", "max", "q01", "q99")]
        lines.append(f"  {str(names[j]):<10}" + "".join(f"{_fmt(v):>11}" for v in vals) + f"  {note}")
    const = [int(j) for j in np.flatnonzero(n.constant)]
    lines.append(f"  near-constant dims: {const if const else 'none'}")

    if ds.gripper is not None:
        g = ds.gripper
        flips = []
        for p in range(ds.num_episodes):
            s, e = ds.episode_sample_range(p)
            binary = ds._actions[s:e, g.index]
            flips.append(len(weighting.gripper_flips(binary, 0.5)))
        f = np.array(flips)
        lines.append(
            f"gripper   dim {g.index}  levels {g.levels[0]:g}/{g.levels[1]:g}  threshold {g.threshold:g}  open={g.open_value:g}"
        )
        hist = np.bincount(f)
        lines.append(
            f"  flips per episode: min {f.min()}  mean {f.mean():.2f}  max {f.max()}   histogram "
            + "  ".join(f"{k}:{c}" for k, c in enumerate(hist) if c)
        )
        if (f == 0).any():
            lines.append(
                f"  WARNING: {(f == 0).sum()} episode(s) without a gripper flip (all arm-phase labels)"
            )
    if ds.phase_key:
        lines.append(f"routing   from phase column {ds.phase_key!r} ({ds.num_experts} experts)")
    if getattr(ds, "has_routing", True):
        bal = ds.router_label_balance()
        total = max(int(bal.sum()), 1)
        lines.append(
            "router labels: "
            + "  ".join(f"{k}:{c} ({100 * c / total:.1f}%)" for k, c in enumerate(bal))
            + f"   (sigma_lead {ds.sigma_lead:g}, sigma_trail {ds.sigma_trail:g})"
        )
    if findings:
        lines.append("findings:")
        lines += [f"  - {f}" for f in findings]
    return "\n".join(lines)
