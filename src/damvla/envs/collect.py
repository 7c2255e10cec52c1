"""``damvla collect metaworld``: scripted-expert demonstrations written as a LeRobot v3.0 dataset.

    damvla collect metaworld --suite pick-place-v3 --episodes 50 --out data/mw-pick-place
    damvla collect metaworld --suite grip --episodes 100 --release --workers 2 --out data/mw-grip

Per task, seeds ``seed_offset, seed_offset + 1, ...`` of the training pool are tried in order until
``--episodes`` successes or ``--max-tries`` attempts; only successful episodes are stored. Every frame
records the upright uint8 image, the proprio state (end-effector xyz + finger opening) and the executed
7-D action (gripper binarised, 1 = open). The result does not depend on ``--workers``: episodes are
consumed in submission order, so the same command always keeps the same seeds in the same order.

Resumable: the writer stages episodes in ``OUT.partial`` and this module logs every attempt (initial
state included) to ``OUT.partial/damvla_attempts.jsonl``; rerunning the same command after an
interruption skips stored episodes and seeds already tried. At the end the log is copied to
``OUT/meta/damvla_episodes.jsonl`` (one JSON line per attempt: key, task, seed, success, kept,
episode_index, steps, initial_state) so evaluation can avoid the training states.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from damvla.keys import ENV_STATE_KEY, MAIN_IMAGE_KEY, STATE_KEY, image_key

ATTEMPTS_FILE = "damvla_attempts.jsonl"  # in the writer's staging folder while collecting
EPISODES_FILE = "meta/damvla_episodes.jsonl"  # in the finished dataset


@dataclass(frozen=True)
class CollectJob:
    """One rollout: everything a worker needs (picklable, no env objects)."""

    task: str
    seed: int
    camera: str
    resolution: int
    max_steps: int | None
    release: bool
    hold_steps: int
    noise: float = 0.0  # std of the executed xyz perturbation (DART); 0: the expert's own actions
    policy: str | None = None  # DAgger: a checkpoint folder whose actions are executed (the expert labels)
    beta: float = 0.0  # DAgger: per-step probability of executing the expert's command instead
    environment_state: bool = False  # also record Meta-World's full observation (ENV_STATE_KEY)
    extra_cameras: tuple[str, ...] = ()  # further cameras, recorded as observation.images.<name>


# DART-style collection (Laskey et al. 2017, "DART: Noise Injection for Robust Imitation Learning"): the
# executed xyz command is the expert's plus an AR(1) perturbation, while the dataset records the expert's own
# command at every visited state. Demonstrations then cover the off-course states a learned policy drifts
# into, labelled with the closed-loop expert's correction. The noise is correlated over ~10 steps (1 / (1 - rho))
# because a policy's errors are: independent per-step noise averages out within a few steps (our choice).
NOISE_CORRELATION = 0.9
NOISE_STREAM = 0xDA27  # the perturbation's random stream, seeded with the episode's seed


# DAgger (Ross et al. 2011): a trained policy drives, the expert labels every state it visits, and the
# episodes are kept whether or not the policy succeeded; training on them together with the demonstrations
# (``--from``) teaches the corrections from exactly the states the policy drifts into.
MIX_STREAM = 0xDA66  # the per-step expert/learner choice's random stream, seeded with the episode's seed


# ---- worker side ---------------------------------------------------------------------------------
_WORKER_ENV: Any = None  # (task, cameras, resolution, max_steps) -> MetaWorldEnv, one at a time per worker
_WORKER_POLICY: Any = None  # (checkpoint folder, DAMVLAPolicy): loaded once per worker


def _worker_init() -> None:
    """Process-pool initializer."""
    # One llvmpipe raster thread per worker: the workers already fill the cores, and Mesa's default
    # (one thread per core in every process) oversubscribes them.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")


def _close_worker_env() -> None:
    global _WORKER_ENV
    if _WORKER_ENV is not None:
        _WORKER_ENV[1].close()
        _WORKER_ENV = None


def _get_env(job: CollectJob) -> Any:
    """The worker's env for ``job``, rebuilt only when the task or camera settings change (jobs arrive
    grouped by task, so this is rare)."""
    global _WORKER_ENV
    from damvla.envs.metaworld import MetaWorldEnv

    spec = (job.task, job.camera, job.extra_cameras, job.resolution, job.max_steps)
    if _WORKER_ENV is None or _WORKER_ENV[0] != spec:
        _close_worker_env()
        env = MetaWorldEnv(job.task, job.camera, job.resolution, job.max_steps, extra_cameras=job.extra_cameras)
        _WORKER_ENV = (spec, env)
    return _WORKER_ENV[1]


def _get_policy(path: str) -> Any:
    global _WORKER_POLICY
    if _WORKER_POLICY is None or _WORKER_POLICY[0] != path:
        import torch

        from damvla.model.policy import DAMVLAPolicy

        torch.set_num_threads(1)  # one rollout per worker process: the workers already fill the cores
        _WORKER_POLICY = (path, DAMVLAPolicy.from_pretrained(path).eval())
    return _WORKER_POLICY[1]


def run_episode(job: CollectJob) -> dict[str, Any]:
    """Roll out the scripted expert for ``job`` and return the episode.

    Returns a dict with ``task, seed, key, success, success_final, steps, initial_state`` and, when
    successful, ``frames``: ``{MAIN_IMAGE_KEY: uint8 (T, H, W, 3), STATE_KEY: float32 (T, 4),
    "action": float32 (T, 7)}`` (plus ``ENV_STATE_KEY``: float32 (T, 39) with ``job.environment_state``, and
    ``observation.images.<name>`` for each of ``job.extra_cameras``); frame t holds the observation before action t. With ``job.noise`` the
    executed xyz command is perturbed (``NOISE_CORRELATION``) and ``action`` still holds the expert's.
    With ``job.policy`` (DAgger) the checkpoint's action is executed (the expert's with probability
    ``job.beta``), ``action`` holds the expert's, and ``frames`` is returned whether or not it succeeded.
    """
    from damvla.envs.metaworld import MetaWorldExpert, ReleaseAtSuccess

    env = _get_env(job)
    init = env.sample_initial_state(job.seed)
    expert: MetaWorldExpert | ReleaseAtSuccess = MetaWorldExpert(job.task)
    if job.release:
        expert = ReleaseAtSuccess(expert, job.hold_steps)
    expert.reset()
    obs = env.reset(init)
    images, states, actions, privileged = [], [], [], []
    extra_images: dict[str, list[np.ndarray]] = {c: [] for c in job.extra_cameras}
    info: dict[str, Any] | None = None
    success, done = False, False
    rng = np.random.default_rng([job.seed, NOISE_STREAM]) if job.noise > 0 else None
    drift = np.zeros(3)
    learner = None
    if job.policy is not None:
        from damvla.evaluation.executors import CheckpointExecutor

        # Chunked execution and its noise exactly as `damvla eval` runs the checkpoint (seeded per episode).
        learner = CheckpointExecutor(_get_policy(job.policy), [init.key], seed=job.seed)
        mix = np.random.default_rng([job.seed, MIX_STREAM])
    while True:
        a = expert.act(obs, info)
        images.append(obs["image"])
        for c in job.extra_cameras:
            extra_images[c].append(obs["images"][c])
        states.append(obs["state"])
        privileged.append(obs["privileged"])
        actions.append(a)  # the label: the expert's command, also where the executed one was perturbed
        if learner is not None:
            batch = {"slot": [0], "episode_index": [0], "episode_start": [len(actions) == 1],
                     "task": [env.instruction], MAIN_IMAGE_KEY: obs["image"].transpose(2, 0, 1)[None],
                     STATE_KEY: obs["state"][None]}  # fmt: skip
            for c in job.extra_cameras:
                batch[image_key(c)] = obs["images"][c].transpose(2, 0, 1)[None]
            proposed = learner(batch)[0]  # every step, so the learner's action queue stays in step
            if mix.random() >= job.beta:
                a = proposed.astype(np.float64)
        elif rng is not None:
            rho = NOISE_CORRELATION
            drift = rho * drift + np.sqrt(1 - rho**2) * job.noise * rng.standard_normal(3)
            a = a.copy()
            a[:3] = np.clip(a[:3] + drift, -1.0, 1.0)
        obs, _, done, info = env.step(a)
        success = success or info["success"]
        # Plain expert: stop at the first success. Release variant: keep going until the hold is over.
        if (success and not job.release) or expert.done or (done and not success):
            break
    out: dict[str, Any] = {
        "task": job.task,
        "seed": job.seed,
        "key": init.key,
        "success": bool(success),
        "success_final": bool(info["success"]) if info else False,
        "steps": len(actions),
        "initial_state": init.to_dict(),
        "frames": None,
        "policy_driven": job.policy is not None,
    }
    if success or job.policy is not None:
        out["frames"] = {
            MAIN_IMAGE_KEY: np.stack(images),
            STATE_KEY: np.stack(states).astype(np.float32),
            "action": np.stack(actions).astype(np.float32),
        }
        if job.environment_state:
            out["frames"][ENV_STATE_KEY] = np.stack(privileged).astype(np.float32)
        for c in job.extra_cameras:
            out["frames"][image_key(c)] = np.stack(extra_images[c])
    return out


# ---- main side -----------------------------------------------------------------------------------
def features(resolution: int, state_names: list[str], environment_state: bool = False,
             extra_cameras: Sequence[str] = ()) -> dict[str, dict[str, Any]]:  # fmt: skip
    """LeRobot feature dicts of a Meta-World dataset at ``resolution`` x ``resolution``."""
    from damvla.envs.base import ACTION_NAMES
    from damvla.envs.metaworld import PRIVILEGED_NAMES

    env = {ENV_STATE_KEY: {"dtype": "float32", "shape": [len(PRIVILEGED_NAMES)], "names": list(PRIVILEGED_NAMES)}}
    video = {"dtype": "video", "shape": [resolution, resolution, 3], "names": ["height", "width", "channels"]}
    cameras = {key: dict(video) for key in [MAIN_IMAGE_KEY] + [image_key(c) for c in extra_cameras]}
    return (cameras | {
        STATE_KEY: {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
        "action": {"dtype": "float32", "shape": [7], "names": list(ACTION_NAMES)},
    }) | (env if environment_state else {})


def _read_attempts(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A line cut by a crash can only be the last one; that attempt is simply redone.
                print(f"damvla collect: ignoring unreadable line {i + 1} of {path}", file=sys.stderr)
    return rows


def _append_attempt(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# recipe key -> the command-line option that sets it (for messages)
RECIPE_FLAGS = {"tasks": "--suite", "episodes_per_task": "--episodes", "camera": "--camera",
                "resolution": "--resolution", "release": "--release", "max_steps": "--max-steps",
                "seed_offset": "--seed-offset", "noise": "--noise", "policy": "--policy", "beta": "--beta",
                "from": "--from", "environment_state": "--environment-state",
                "extra_cameras": "--extra-cameras"}  # fmt: skip


def recipe_difference(dataset: dict[str, Any], command: dict[str, Any]) -> str:
    """``"--resolution: dataset 32, this command 64; ..."`` for every recipe setting that differs."""
    diffs = []
    for key, value in command.items():
        if dataset.get(key) != value:
            have = dataset[key] if key in dataset else "not recorded"
            diffs.append(f"{RECIPE_FLAGS.get(key, key)}: dataset {have}, this command {value}")
    return "; ".join(diffs)


def collect_metaworld(
    out: str | Path,
    suite: str,
    episodes: int,
    camera: str | None = None,
    resolution: int | None = None,
    release: bool = False,
    workers: int = 2,
    max_steps: int | None = None,
    seed_offset: int = 0,
    max_tries: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    noise: float = 0.0,
    policy: str | Path | None = None,
    beta: float = 0.0,
    base: str | Path | None = None,
    environment_state: bool = False,
    extra_cameras: Sequence[str] = (),
) -> dict[str, Any]:
    """Collect ``episodes`` successful expert episodes per task of ``suite`` into the dataset ``out``.

    Returns a summary ``{"out", "tasks": {task: {"kept", "tried"}}, "episodes", "frames", "seconds"}``.
    Rerunning a finished command is a no-op (the summary then has ``"complete": True``); a finished
    dataset made with other settings raises ``ValueError`` (unless ``overwrite``). ``noise`` > 0 collects
    DART-style: the executed xyz commands are perturbed, the recorded ones are the expert's. ``policy`` (a
    checkpoint folder) collects DAgger-style: the policy drives (the expert with probability ``beta`` per
    step), the expert labels, and every episode is kept. ``base`` (a dataset made by this command) is copied
    in first, so the result aggregates it; new seeds then continue after the base's. ``environment_state``
    also records Meta-World's full observation per frame as ``observation.environment_state`` (object and
    goal positions: a training target, ``env_state_dim``; no policy reads it).
    """
    from tqdm.auto import tqdm

    from damvla.data.lerobot import LeRobotWriter
    from damvla.envs.base import GRIPPER_INDEX, GRIPPER_OPEN, GRIPPER_THRESHOLD
    from damvla.envs.metaworld import (
        DEFAULT_CAMERA,
        DEFAULT_RESOLUTION,
        EVAL_SEED_OFFSET,
        INSTRUCTIONS,
        RELEASE_HOLD_STEPS,
        SIMULATOR,
        MetaWorldEnv,
        dataset_action_mapping,
        initial_state_seeds,
        resolve_suite,
    )

    t_start = time.perf_counter()
    tasks = resolve_suite(suite)
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"--noise must be in [0, 1] (action units: 1 = 1 cm per step), got {noise}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--beta must be in [0, 1], got {beta}")
    if policy is None and beta:
        raise ValueError("--beta mixes the expert into a --policy's rollouts: give --policy CHECKPOINT")
    if policy is not None and noise:
        raise ValueError("--noise perturbs the expert's rollouts; with --policy the checkpoint drives: use one")
    if policy is not None:
        # Load and check it here, once, before any worker: the same checks as `damvla eval`, and the camera
        # and resolution default to the checkpoint's training data.
        from damvla.evaluate import check_checkpoint
        from damvla.model.policy import DAMVLAPolicy, resolve_checkpoint

        policy = resolve_checkpoint(policy).resolve()
        setup = check_checkpoint(DAMVLAPolicy.from_pretrained(policy), tasks, camera, resolution)
        camera, resolution = setup.camera, setup.resolution
        if extra_cameras and list(extra_cameras) != setup.extra_cameras:
            raise ValueError(f"--extra-cameras {list(extra_cameras)}: the checkpoint reads {setup.extra_cameras}")
        extra_cameras = setup.extra_cameras  # the policy drives: it needs every camera it reads
    camera = camera or DEFAULT_CAMERA
    extra_cameras = tuple(extra_cameras)
    resolution = int(resolution or DEFAULT_RESOLUTION)
    base_episodes = (_base_episodes(Path(base), camera, resolution, tasks, environment_state, extra_cameras)
                     if base is not None else [])  # fmt: skip
    max_tries = int(max_tries or 2 * episodes + 10)
    if max_tries < episodes:
        raise ValueError(f"--max-tries ({max_tries}) must be >= --episodes ({episodes})")
    initial_state_seeds("train", max_tries, seed_offset)  # raises if the seeds reach the eval pool
    out = Path(out)
    recipe_key = {"tasks": tasks, "episodes_per_task": episodes, "camera": camera, "resolution": resolution,
                  "release": release, "max_steps": max_steps, "seed_offset": seed_offset}  # fmt: skip
    if noise > 0:  # recorded only when used: datasets made before the option compare equal
        recipe_key["noise"] = float(noise)
    if policy is not None:
        recipe_key.update(policy=str(policy), beta=float(beta))
    if base is not None:
        recipe_key["from"] = str(Path(base).resolve())
    if environment_state:  # recorded only when used, like noise
        recipe_key["environment_state"] = True
    if extra_cameras:  # likewise
        recipe_key["extra_cameras"] = list(extra_cameras)
    if (out / "meta" / "info.json").exists() and not overwrite:
        old = json.loads((out / "meta" / "info.json").read_text()).get("damvla", {}).get("recipe", {})
        if all(old.get(k) == v for k, v in recipe_key.items()):
            # The same command already finished: rerunning it is a no-op, not an error.
            print(f"damvla collect: {out} is already complete", file=sys.stderr)
            return {
                "out": str(out),
                "tasks": {},
                "episodes": 0,
                "frames": 0,
                "seconds": 0.0,
                "complete": True,
            }
        # ValueError (not FileExistsError) so the CLI reports it as a usage error with exit code 1.
        raise ValueError(
            f"{out} is already a finished dataset made with different settings ({recipe_difference(old, recipe_key)}); "
            f"choose another --out or pass --overwrite"
        )

    # Fail fast in this process (bad camera name, no EGL) before spawning workers.
    probe = MetaWorldEnv(tasks[0], camera, resolution, max_steps, extra_cameras=extra_cameras)
    fps = round(probe.fps)
    state_names = list(probe.state_names)
    probe.close()

    recipe = {
        "simulator": SIMULATOR,
        "suite": suite,
        **recipe_key,
        "release_hold_steps": RELEASE_HOLD_STEPS if release else 0,
        "max_tries": max_tries,
        "seed_pool": f"train seeds [{seed_offset}, {EVAL_SEED_OFFSET}); eval seeds >= {EVAL_SEED_OFFSET}",
        "expert": "metaworld.policies (gripper binarised)" + (" + release at success" if release else "")
        + (f" + DART noise: executed xyz perturbed by AR(1), rho {NOISE_CORRELATION}, std {noise}" if noise > 0 else "")
        + (f"; DAgger: {policy} drives, the expert with p {beta} per step, every episode kept" if policy else ""),
        "episodes_file": EPISODES_FILE,
    }
    extra = {
        "damvla": {
            "gripper_index": GRIPPER_INDEX,
            "gripper_threshold": GRIPPER_THRESHOLD,
            "gripper_open": GRIPPER_OPEN,
            "action_mapping": dataset_action_mapping(tasks),
            "recipe": recipe,
        }
    }
    writer = LeRobotWriter(
        out,
        fps=fps,
        features=features(resolution, state_names, environment_state, extra_cameras),
        robot_type="sawyer",
        image_mode="video",
        extra_info=extra,
        overwrite=overwrite,
    )
    attempts_path = writer.staging / ATTEMPTS_FILE
    try:
        base_keys = {row["key"] for row, _ in base_episodes}
        _copy_base(writer, attempts_path, base_episodes, Path(base) if base is not None else None, progress,
                   environment_state, extra_cameras)
        done_keys = {k: i for k, i in writer.completed_episodes().items() if k not in base_keys}
        log = [r for r in _read_attempts(attempts_path) if not r.get("from")]
        logged = {r["key"] for r in log}
        kept = dict.fromkeys(tasks, 0)
        tried = dict.fromkeys(tasks, 0)
        next_seed = dict.fromkeys(tasks, seed_offset)
        for row, _ in base_episodes:  # new seeds continue after the base's
            next_seed[row["task"]] = max(next_seed[row["task"]], int(row["seed"]) + 1)
        for r in log:
            if r["task"] in tried:
                tried[r["task"]] += 1
                next_seed[r["task"]] = max(next_seed[r["task"]], int(r["seed"]) + 1)
        for key, index in done_keys.items():
            task, seed = key.rsplit("/seed-", 1)
            if task not in kept:
                continue
            kept[task] += 1
            if key not in logged:  # stored, but the crash came before its log line: log it now
                tried[task] += 1
                next_seed[task] = max(next_seed[task], int(seed) + 1)
                _append_attempt(attempts_path, {"key": key, "task": task, "seed": int(seed), "success": True,
                                                "kept": True, "episode_index": index, "recovered": True})  # fmt: skip

        def plan(task: str) -> list[CollectJob]:
            n = min(episodes - kept[task], max_tries - tried[task])
            seeds = range(next_seed[task], next_seed[task] + max(n, 0))
            next_seed[task] += max(n, 0)
            return [
                CollectJob(task, s, camera, resolution, max_steps, release, RELEASE_HOLD_STEPS, float(noise),
                           None if policy is None else str(policy), float(beta), environment_state,
                           extra_cameras)  # fmt: skip
                for s in seeds
            ]

        queue: deque[CollectJob] = deque(j for t in tasks for j in plan(t))
        outstanding = {t: sum(j.task == t for j in queue) for t in tasks}
        bar = tqdm(total=episodes * len(tasks), initial=sum(kept.values()), desc="collect", unit="ep",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip

        def handle(res: dict[str, Any]) -> None:
            task = res["task"]
            tried[task] += 1
            outstanding[task] -= 1
            row = {
                k: res[k]
                for k in ("key", "task", "seed", "success", "success_final", "steps", "initial_state")
            }
            row["kept"] = False
            if (res["success"] or res["policy_driven"]) and kept[task] < episodes:
                index = writer.add_episode(res["frames"], task=INSTRUCTIONS[task], key=res["key"])
                kept[task] += 1
                row.update(kept=True, episode_index=index)
                bar.update(1)
            _append_attempt(attempts_path, row)
            bar.set_postfix(tried=sum(tried.values()), refresh=False)
            if outstanding[task] == 0 and kept[task] < episodes:
                more = plan(task)  # retry with fresh seeds; appended, so the order stays deterministic
                queue.extend(more)
                outstanding[task] += len(more)

        if workers == 1:  # in-process, same code path as a worker
            try:
                while queue:
                    handle(run_episode(queue.popleft()))
            finally:
                _close_worker_env()
        else:
            # spawn: a fresh interpreter per worker, so no GL context or MuJoCo state is inherited.
            ctx = mp.get_context("spawn")
            window = 2 * workers + 2  # rollouts in flight: keeps workers busy, bounds memory
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                pending: deque[Future[dict[str, Any]]] = deque()
                while queue or pending:
                    while queue and len(pending) < window:
                        pending.append(pool.submit(run_episode, queue.popleft()))
                    handle(pending.popleft().result())  # in submission order: deterministic output
        bar.close()

        summary_tasks = {t: {"kept": kept[t], "tried": tried[t]} for t in tasks}
        for t, s in summary_tasks.items():
            flag = "" if s["kept"] >= episodes else f"  (short: max tries {max_tries} reached)"
            print(f"{t:30s} kept {s['kept']:4d} / tried {s['tried']:4d}{flag}", file=sys.stderr)
        if writer.num_episodes == 0:
            raise ValueError(f"no successful episode for {tasks}; nothing to write to {out}")
        # The recipe records which seeds were kept, in episode order (the full initial states are in
        # EPISODES_FILE); set before finalize so info.json carries it.
        by_index = sorted((i, k) for k, i in writer.completed_episodes().items())
        seeds: dict[str, list[int]] = {t: [] for t in tasks}
        for _, key in by_index:
            task, seed = key.rsplit("/seed-", 1)
            seeds.setdefault(task, []).append(int(seed))
        writer.extra_info["damvla"]["recipe"]["seeds"] = seeds
        writer.extra_info["damvla"]["recipe"]["tried"] = {t: tried[t] for t in tasks}
        attempts_text = attempts_path.read_text() if attempts_path.exists() else ""
        num_frames = writer.num_frames
        writer.finalize()
        _write_text_atomic(out / EPISODES_FILE, attempts_text)
    except BaseException:
        writer.close()  # keep the staged episodes for a resume
        raise
    return {
        "out": str(out),
        "tasks": summary_tasks,
        "episodes": sum(kept.values()),
        "frames": num_frames,
        "seconds": time.perf_counter() - t_start,
    }


def _base_episodes(base: Path, camera: str, resolution: int, tasks: list[str], environment_state: bool = False,
                   extra_cameras: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], int]]:  # fmt: skip
    """(attempt-log row, episode index) of every kept episode of the dataset ``base``, checked to match."""
    from damvla.data.lerobot import LeRobotDatasetReader

    if not (base / "meta" / "info.json").is_file():
        raise ValueError(f"--from {base}: not a finished dataset (no meta/info.json)")
    reader = LeRobotDatasetReader(base)
    recipe = reader.info.get("damvla", {}).get("recipe", {})
    for key, want in (("camera", camera), ("resolution", resolution)):
        if recipe.get(key) != want:
            raise ValueError(f"--from {base}: its {key} is {recipe.get(key)!r}, this collection's {want!r}")
    if list(recipe.get("extra_cameras") or []) != list(extra_cameras):
        raise ValueError(f"--from {base}: its extra cameras are {recipe.get('extra_cameras') or []}, this "
                         f"collection's {list(extra_cameras)}")  # fmt: skip
    if environment_state and ENV_STATE_KEY not in reader.features:
        raise ValueError(f"--from {base}: it has no {ENV_STATE_KEY} to copy; collect it with --environment-state too")
    rows = [r for r in load_episode_records(base) if r.get("kept")]
    other = sorted({r["task"] for r in rows} - set(tasks))
    if other:
        raise ValueError(f"--from {base}: it has episodes of {other}, which --suite does not include")
    n = reader.num_episodes
    if len(rows) != n:
        raise ValueError(f"--from {base}: its attempt log names {len(rows)} kept episodes, the dataset has {n}")
    return [(r, int(r["episode_index"])) for r in rows]


def _copy_base(writer: Any, attempts_path: Path, episodes: list[tuple[dict[str, Any], int]], base: Path | None,
               progress: bool, environment_state: bool = False, extra_cameras: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Copy the base dataset's episodes into ``writer`` (those not there yet: a resumed run skips them)."""
    if not episodes:
        return
    from tqdm.auto import tqdm

    from damvla.data.lerobot import LeRobotDatasetReader

    reader = LeRobotDatasetReader(base)
    done = writer.completed_episodes()
    todo = [(r, i) for r, i in episodes if r["key"] not in done]
    for row, index in tqdm(todo, desc="copy --from", unit="ep", disable=not progress or not todo):
        frames = reader.episode_arrays(index, [STATE_KEY, "action"] + ([ENV_STATE_KEY] if environment_state else []))
        for key in [MAIN_IMAGE_KEY] + [image_key(c) for c in extra_cameras]:
            frames[key] = reader.episode_frames(index, key)
        new = writer.add_episode(frames, task=reader.episode(index).tasks[0], key=row["key"])
        _append_attempt(attempts_path, {**row, "episode_index": new, "from": str(base)})


def load_episode_records(root: str | Path) -> list[dict[str, Any]]:
    """The attempt log of a collected dataset (``meta/damvla_episodes.jsonl``): one dict per attempt
    with ``key, task, seed, success, kept, episode_index, initial_state``."""
    path = Path(root) / EPISODES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no attempt log (was {root} made by `damvla collect`?)")
    return _read_attempts(path)


# ---- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="simulator", metavar="SIMULATOR", required=True)
    p = sub.add_parser("metaworld", help="Meta-World v3 scripted experts",
                       description="Collect Meta-World v3 scripted-expert demonstrations (LeRobot v3.0).")  # fmt: skip
    p.add_argument(
        "--suite", required=True, help="mt10 | mt50 | grip | comma-separated tasks (pick-place-v3,...)"
    )
    p.add_argument("--episodes", type=int, required=True, help="successful episodes to keep per task")
    p.add_argument("--out", required=True, help="dataset folder to create (staged in OUT.partial until done)")
    p.add_argument("--camera", default=None, help="Meta-World camera (default corner4; corner, corner2, ..., or our free \"workspace\" and \"front\" views)")
    p.add_argument("--resolution", type=int, default=None, help="square image size in pixels (default 128)")
    p.add_argument("--release", action="store_true", help="open the gripper at success and hold (2 flips)")
    p.add_argument("--workers", type=int, default=2, help="parallel rollout processes (default 2)")
    p.add_argument("--max-steps", type=int, default=None, help="time limit per episode (default 500)")
    p.add_argument("--seed-offset", type=int, default=0, help="first training seed (default 0)")
    p.add_argument("--max-tries", type=int, default=None, help="attempts per task (default 2*episodes+10)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="DART: std of a correlated perturbation of the executed xyz commands (action units, "
                        "e.g. 0.3); the dataset records the expert's unperturbed commands (default 0: off)")  # fmt: skip
    p.add_argument("--policy", default=None, metavar="CHECKPOINT",
                   help="DAgger: this checkpoint drives, the expert labels every visited state, every episode is "
                        "kept (camera and resolution default to its training data's)")  # fmt: skip
    p.add_argument("--beta", type=float, default=0.0,
                   help="DAgger: per-step probability of executing the expert's command instead (default 0)")
    p.add_argument("--from", dest="base", default=None, metavar="DATASET",
                   help="copy this dataset's episodes in first (aggregation); new seeds continue after its")
    p.add_argument("--environment-state", action="store_true",
                   help="also record Meta-World's 39-d observation (hand, object and goal positions) per frame as "
                        "observation.environment_state, the target of the training option env_state_dim=39")  # fmt: skip
    p.add_argument("--extra-cameras", default="", metavar="NAME[,NAME]",
                   help="further cameras to record, each as observation.images.NAME (same resolution), for a "
                        "policy that reads several (vision.extra_cameras); e.g. --camera front --extra-cameras corner4")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset / staging folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.simulator != "metaworld":
        raise ValueError(f"unknown simulator {args.simulator!r}; expected 'metaworld'")
    summary = collect_metaworld(
        out=args.out,
        suite=args.suite,
        episodes=args.episodes,
        camera=args.camera,
        resolution=args.resolution,
        release=args.release,
        workers=args.workers,
        max_steps=args.max_steps,
        seed_offset=args.seed_offset,
        max_tries=args.max_tries,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        noise=args.noise,
        policy=args.policy,
        beta=args.beta,
        base=args.base,
        environment_state=args.environment_state,
        extra_cameras=[c for c in args.extra_cameras.split(",") if c],
    )
    if summary.get("complete"):
        return 0
    print(
        f"wrote {summary['episodes']} episodes ({summary['frames']} frames) to {summary['out']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0
