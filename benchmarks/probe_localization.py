"""Can the frozen vision features place the goal and the object? A linear probe per input resolution.

    python benchmarks/probe_localization.py --dataset DATA [--views 112:1,224:2,224:1] [--frames 6]

Closed-loop failures of the cpu preset come late (carrying the puck to the goal) or at reaching a small
object, and the goal is a dot of a few pixels in the 128-px corner4 view. This asks, cheaply and before any
training run, whether the frozen DINOv2-S features the policy reads carry those positions at all, and how
that depends on the image size the encoder sees and on pooling of the patch grid.

For each view ``SIZE:POOL`` the frames of DATA (a `damvla collect metaworld` dataset: its
``meta/damvla_episodes.jsonl`` records every episode's goal and initial object position) are resized to SIZE,
encoded by the cpu preset's frozen DINOv2-S, and their patch grid pooled by POOL; a ridge regression from the
flattened grid (plus the position code the policy adds) predicts

- the goal's x, y from ``--frames`` frames spread over each episode (the goal never moves), and
- the object's initial x, y from the episode's first frame (before the hand has touched it), and
- the goal's height z, over the episodes of tasks that vary it (pick-place): a single view sees a floating goal's
  height and its depth along one image axis, and the grip3 policies place almost no high pick-place goal.

Errors are on held-out episodes (5 folds by episode; the ridge strength is chosen inside each training fold),
in centimetres, next to the error of always predicting the mean. Render DATA at 224 px or more
(``--resolution 224``) to compare sizes: smaller views are resized down from it, as training resizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from damvla.config import preset  # noqa: E402
from damvla.data.dataset import PolicyDataset, resize_images  # noqa: E402
from damvla.model.vision import DualVisionEncoder, grid_position_code  # noqa: E402

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2)  # on the kernel scaled by 1 / width


def folds(groups: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    ids = np.random.default_rng(seed).permutation(np.unique(groups))
    return [np.isin(groups, part) for part in np.array_split(ids, k)]


def ridge_predict(gram: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, lam: float) -> np.ndarray:
    """Ridge regression in its dual form on a precomputed linear kernel (the features are far wider than the
    samples), with the features centred on the training rows' mean."""
    m = gram[:, train].mean(1)
    mm = m[train].mean()
    k_tt = gram[np.ix_(train, train)] - m[train][:, None] - m[train][None, :] + mm
    k_st = gram[np.ix_(test, train)] - m[test][:, None] - m[train][None, :] + mm
    mu_y = y[train].mean(0)
    alpha = np.linalg.solve(k_tt + lam * np.eye(len(k_tt)), y[train] - mu_y)
    return k_st @ alpha + mu_y


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Held-out RMSE (same units as y) of a ridge probe, the strength chosen by inner cross-validation."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    gram = x @ x.T / x.shape[1]
    err = np.zeros_like(y)
    for test in folds(groups, 5):
        train = np.flatnonzero(~test)
        scores = []
        for lam in LAMBDAS:
            se = 0.0
            for val in folds(groups[train], 4, seed=1):
                p = ridge_predict(gram, y, train[~val], train[val], lam)
                se += float(((p - y[train[val]]) ** 2).sum())
            scores.append(se)
        lam = LAMBDAS[int(np.argmin(scores))]
        err[test] = ridge_predict(gram, y, train, np.flatnonzero(test), lam) - y[test]
    return float(np.sqrt((err**2).sum(1).mean()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--views", default="112:1,224:2,224:1", help="SIZE:POOL,... (the cpu preset reads 112:1)")
    p.add_argument("--frames", type=int, default=6, help="frames per episode for the goal probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    meta = [json.loads(x) for x in (args.dataset / "meta" / "damvla_episodes.jsonl").read_text().splitlines() if x.strip()]
    kept = {m["episode_index"]: m for m in meta if m.get("kept", True)}
    views = [tuple(int(v) for v in view.split(":")) for view in args.views.split(",")]
    # Decoded at the largest view's size; smaller views are resized down from it, as training resizes.
    ds = PolicyDataset(args.dataset, image_size=max(size for size, _ in views), require_routing=False, progress=False)
    rows = []  # (episode position, frame, goal xy, object xy, task, goal z)
    for pos, ep in enumerate(ds.episode_indices):
        m = kept[int(ep)]
        data = m["initial_state"]["data"]
        n = int(ds._ep_len[pos])
        for f in np.linspace(0, n - 1, args.frames).round().astype(int):
            rows.append((pos, int(f), data["goal_pos"][:2], data["obj_init_pos"][:2], m["task"], data["goal_pos"][2]))
    groups = np.array([r[0] for r in rows])
    goal = np.array([r[2] for r in rows]) * 100.0  # cm
    obj = np.array([r[3] for r in rows]) * 100.0
    first = np.array([r[1] == 0 for r in rows])
    tasks = sorted({r[4] for r in rows})
    height = np.array([r[5] for r in rows])[:, None] * 100.0
    varies = {t for t in tasks if np.ptp(height[[r[4] == t for r in rows]]) > 1.0}
    tall = np.array([r[4] in varies for r in rows])  # rows of tasks whose goal height varies
    print(f"{len(set(groups))} episodes ({', '.join(tasks)}), {len(rows)} frames")

    # uint8 (N, 3, S, S) at the dataset's size (the dataset keeps decoded episodes in its own cache)
    raw = torch.stack([ds._episode_frames(r[0])[r[1]] for r in rows])
    results = []
    for size, pool in views:
        view = f"{size}:{pool}"
        cfg = preset("cpu").vision
        cfg.image_size, cfg.patch_pool = size, pool
        enc = DualVisionEncoder(cfg).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            pix = resize_images(raw, size) if raw.shape[-1] != size else raw
            feats = [enc(pix[i : i + 32].float() / 255.0) for i in range(0, len(pix), 32)]
        ms = (time.perf_counter() - t0) / len(pix) * 1e3
        patches = torch.cat([f.patches for f in feats])
        patches = patches + grid_position_code(patches.shape[1], patches.shape[2])
        cls = torch.cat([f.cls for f in feats]).flatten(1).numpy()
        grid = patches.flatten(1).numpy()
        row = {"view": view, "tokens": int(patches.shape[1]), "encode_ms_per_frame": round(ms, 1)}
        for name, x in (("grid", grid), ("cls", cls)):
            row[f"goal_rmse_cm_{name}"] = round(probe(x, goal, groups), 2)
            row[f"object_rmse_cm_{name}"] = round(probe(x[first], obj[first], groups[first]), 2)
            if tall.any():
                row[f"goal_z_rmse_cm_{name}"] = round(probe(x[tall], height[tall], groups[tall]), 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    base = {"goal_rmse_cm_mean": round(float(np.sqrt(((goal - goal.mean(0)) ** 2).sum(1).mean())), 2),
            "object_rmse_cm_mean": round(float(np.sqrt(((obj[first] - obj[first].mean(0)) ** 2).sum(1).mean())), 2)}  # fmt: skip
    if tall.any():
        base["goal_z_rmse_cm_mean"] = round(float(height[tall].std()), 2)
    print(json.dumps(base))
    z = tall.any()
    print("\n| view (size:pool) | tokens | goal, grid | goal, class token | object, grid | object, class token |"
          + (" goal z, grid | goal z, class token |" if z else "") + " encode ms/frame |")
    print("|---|---|---|---|---|---|" + ("---|---|" if z else "") + "---|")
    for r in results:
        zs = f" {r['goal_z_rmse_cm_grid']} | {r['goal_z_rmse_cm_cls']} |" if z else ""
        print(f"| {r['view']} | {r['tokens']} | {r['goal_rmse_cm_grid']} | {r['goal_rmse_cm_cls']} | "
              f"{r['object_rmse_cm_grid']} | {r['object_rmse_cm_cls']} |{zs} {r['encode_ms_per_frame']} |")
    zb = f" {base['goal_z_rmse_cm_mean']} | |" if z else ""
    print(f"| predict the mean | | {base['goal_rmse_cm_mean']} | | {base['object_rmse_cm_mean']} | |{zb} |")
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    if args.json:
        args.json.write_text(json.dumps({"views": results, "baseline": base, "dataset": str(args.dataset)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
