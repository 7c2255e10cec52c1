"""``damvla eval``: closed-loop evaluation in Meta-World (protocol: docs/evaluation.md).

    damvla eval runs/mw/checkpoints/last --suite mt10 --episodes 10 --out eval/mt10
    damvla eval --policy expert --suite mt10 --episodes 10 --out /tmp/eval_expert --append-results docs/results.md
    damvla eval --policy random --suite pick-place,reach --episodes 5 --out /tmp/eval_random

Episodes start from fixed, recorded initial states of the eval seed pool (``initial_state_seeds("eval",
N)``, disjoint from every training seed), run in parallel worker processes with one batched policy
forward per step for all waiting envs (``damvla.envs.rollout``), and stop at the first success or the
time limit. A checkpoint's 7-D actions reach the simulator through the action mapping stored in its
metadata; everything that can disagree between checkpoint and environment (action layout, camera,
mapping, task coverage, seed overlap) is checked before the first rollout.

Output folder: ``results.json``, ``report.md``, ``index.html``, ``initial_states.jsonl``, ``episodes.jsonl`` (per-step
router weight / head / gripper), ``command.txt``, ``versions.json``, ``run.json``, ``videos/TASK/seed-N.mp4`` and
``plots/TASK/seed-N.png``. A non-empty ``--out`` is refused unless ``--overwrite`` (which deletes those first)
or ``--resume``.

Interruptions: each episode is appended to ``episodes.jsonl`` (one fsynced line) the moment it ends. Ctrl-C
stops the run, writes ``results.json`` of the finished episodes marked ``"complete": false`` and exits 130;
``--resume`` runs the remaining episodes only. Every episode's noise is seeded from its own key, so the
resumed run ends with the same episodes as an uninterrupted one (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from damvla.keys import MAIN_IMAGE_KEY, image_key

POLICIES = ("checkpoint", "expert", "random")
EXECUTIONS = ("chunk", "adaptive_ensemble", "temporal_ensemble")
VIDEO_FPS = 30  # Meta-World runs at 80 Hz; 30 fps plays episodes at ~0.4x, easier to follow


@dataclass
class EvalOptions:
    """Everything one ``damvla eval`` run depends on (the command line, as data)."""

    suite: str
    episodes: int
    out: Path
    checkpoint: str | None = None
    policy: str = "checkpoint"
    workers: int = 2
    max_steps: int | None = None  # None: the task's default time limit (Meta-World: 500)
    execution: str | None = None  # None: the checkpoint's config.inference
    execute_steps: int | None = None
    ensemble_horizon: int | None = None
    cfg_scale: float | None = None  # None: the checkpoint's diffusion.cfg_scale
    inference_steps: int | None = None  # None: the checkpoint's diffusion.inference_steps (DDIM)
    seed: int = 0  # noise / random-policy seed; initial states do not depend on it
    state_offset: int = 0  # first eval-pool seed index
    initial_states: Path | None = None  # replay the states recorded by an earlier run
    videos: int = 1  # first K episodes per task
    plots: int = -1  # first K episodes per task; -1 = all
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads for inference; None: torch's default
    camera: str | None = None
    resolution: int | None = None
    timeout: float = 300.0  # seconds a worker may take to answer one reset / step
    append_results: Path | None = None
    title: str | None = None
    progress: bool = True
    resume: bool = False  # continue the interrupted evaluation in `out`
    overwrite: bool = False  # replace what an earlier evaluation wrote into `out`
    simpler_python: str | None = None  # SimplerEnv's interpreter (else $DAMVLA_SIMPLER_PYTHON)
    simpler_shader: str | None = None  # None: the protocol's shader; "ibl" on a CPU (not comparable)

    def validate(self) -> EvalOptions:
        errs = []
        if self.policy not in POLICIES:
            errs.append(f"--policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "checkpoint" and not self.checkpoint:
            errs.append("--policy checkpoint needs a CHECKPOINT folder (or use --policy expert / random)")
        if self.episodes < 1:
            errs.append(f"--episodes must be >= 1, got {self.episodes}")
        if self.workers < 0:
            errs.append(f"--workers must be >= 0, got {self.workers}")
        if self.max_steps is not None and self.max_steps < 1:
            errs.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.execution is not None and self.execution not in EXECUTIONS:
            errs.append(f"--execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.execute_steps is not None and self.execute_steps < 1:
            errs.append(f"--execute-steps must be >= 1, got {self.execute_steps}")
        if self.ensemble_horizon is not None and self.ensemble_horizon < 1:
            errs.append(f"--ensemble-horizon must be >= 1, got {self.ensemble_horizon}")
        if self.cfg_scale is not None and not self.cfg_scale >= 1.0:
            errs.append(f"--cfg-scale must be >= 1 (1 turns guidance off), got {self.cfg_scale}")
        if self.inference_steps is not None and self.inference_steps < 1:
            errs.append(f"--inference-steps must be >= 1, got {self.inference_steps}")
        if (self.cfg_scale is not None or self.inference_steps is not None) and self.policy != "checkpoint":
            errs.append("--cfg-scale / --inference-steps apply to --policy checkpoint only")
        if self.videos < 0:
            errs.append(f"--videos must be >= 0, got {self.videos}")
        if self.plots < -1:
            errs.append(f"--plots must be >= 0 or -1 (all), got {self.plots}")
        if self.state_offset < 0:
            errs.append(f"--state-offset must be >= 0, got {self.state_offset}")
        if self.threads is not None and self.threads < 1:
            errs.append(f"--threads must be >= 1, got {self.threads}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            errs.append(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.simpler_shader is not None and self.simpler_shader not in ("ibl", "rt", "default"):
            errs.append(f"--simpler-shader must be ibl, rt or default, got {self.simpler_shader!r}")
        if (self.simpler_python or self.simpler_shader) and not self.suite.startswith("simpler:"):
            errs.append("--simpler-python / --simpler-shader apply to --suite simpler:... only")
        if errs:
            raise ValueError("; ".join(errs))
        return self


# ---- environment setup a checkpoint implies ------------------------------------------------------
@dataclass
class EnvSetup:
    """How the envs must be built for the policy under test."""

    action_mapping: dict[str, Any]
    camera: str
    resolution: int
    extra_cameras: list[str] = field(default_factory=list)  # rendered as observation.images.<name>
    training_seeds: dict[str, set[int]] = field(default_factory=dict)
    sigma_lead: float = 6.0
    sigma_trail: float = 2.0
    notes: dict[str, Any] = field(default_factory=dict)  # checks a simulator adapter reports (SIMPLER)


def training_seeds(metadata: dict[str, Any]) -> dict[str, set[int]]:
    """Initial-state seeds the checkpoint's training data used or tried, per task.

    Read from the dataset recipe (``seeds`` kept per task, and the ``tried`` range from
    ``seed_offset``) and, when the dataset folder is still there, its ``meta/damvla_episodes.jsonl``
    attempt log. Empty for datasets not made by ``damvla collect``."""
    dam = metadata.get("damvla") or {}
    recipe = dam.get("recipe") or {}
    out: dict[str, set[int]] = {}
    for task, seeds in (recipe.get("seeds") or {}).items():
        out.setdefault(task, set()).update(int(s) for s in seeds)
    offset = int(recipe.get("seed_offset") or 0)
    for task, tried in (recipe.get("tried") or {}).items():
        out.setdefault(task, set()).update(range(offset, offset + int(tried)))
    source = metadata.get("source")
    if source:
        log = Path(source) / (recipe.get("episodes_file") or "meta/damvla_episodes.jsonl")
        if log.is_file():
            for line in log.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    out.setdefault(str(r["task"]), set()).add(int(r["seed"]))
    return out


def check_checkpoint(policy: Any, tasks: list[str], camera: str | None, resolution: int | None) -> EnvSetup:
    """Everything that must agree between a checkpoint and the Meta-World envs; raises ``ValueError``
    naming the field that disagrees. Returns the env settings to use (the training data's camera and
    resolution unless overridden consistently)."""
    from damvla.envs.base import ACTION_DIM, GRIPPER_INDEX
    from damvla.envs.metaworld import DEFAULT_CAMERA, DEFAULT_RESOLUTION, SIMULATOR, action_mapping_from_dict

    cfg, meta = policy.config, policy.metadata
    where = "checkpoint config.json"
    if cfg.action_dim != ACTION_DIM:
        raise ValueError(
            f"{where}: action_dim={cfg.action_dim}, but Meta-World envs take {ACTION_DIM}-D actions"
        )
    if cfg.gripper_index != GRIPPER_INDEX:
        raise ValueError(
            f"{where}: gripper_index={cfg.gripper_index}, but the env's gripper is dimension {GRIPPER_INDEX}"
        )
    if policy.image_key != MAIN_IMAGE_KEY:
        raise ValueError(
            f"{where}: the policy reads {policy.image_key!r} (vision.camera={cfg.vision.camera!r}); the "
            f"evaluation envs provide their camera as {MAIN_IMAGE_KEY!r}"
        )
    # Extra cameras: `damvla collect metaworld --extra-cameras NAME` stores Meta-World camera NAME under
    # observation.images.NAME, so the name the policy reads is the camera the envs render.
    extra = list(cfg.vision.extra_cameras)
    keys = meta.get("camera_keys")
    if keys is not None and list(keys) != policy.image_keys:
        raise ValueError(
            f"checkpoint metadata.json: camera_keys={keys}, but the policy reads {policy.image_keys} and the envs "
            f"provide {[MAIN_IMAGE_KEY] + [image_key(c) for c in extra]}"
        )
    dam = meta.get("damvla") or {}
    mapping = dam.get("action_mapping")
    if not mapping:
        raise ValueError(
            "checkpoint metadata.json has no damvla.action_mapping: cannot map the policy's 7-D actions to "
            "Meta-World's native actions (train on a dataset made by `damvla collect metaworld`, or add "
            "the mapping of envs.metaworld.dataset_action_mapping to metadata.json)"
        )
    if mapping.get("type") != SIMULATOR:
        raise ValueError(
            f"checkpoint metadata.json: action_mapping type {mapping.get('type')!r} does not match the "
            f"environment {SIMULATOR!r}"
        )
    if int(mapping.get("gripper_index", GRIPPER_INDEX)) != GRIPPER_INDEX:
        raise ValueError(
            f"checkpoint metadata.json: action_mapping.gripper_index={mapping.get('gripper_index')}, env uses {GRIPPER_INDEX}"
        )
    for task in tasks:  # raises for tasks the mapping has no closing effort for
        try:
            action_mapping_from_dict(mapping, task)
        except ValueError as e:
            raise ValueError(f"checkpoint metadata.json: {e}") from e
    recipe = dam.get("recipe") or {}
    if extra and list(recipe.get("extra_cameras") or []) != extra:
        raise ValueError(
            f"{where}: vision.extra_cameras={extra}, but the training data rendered extra cameras "
            f"{recipe.get('extra_cameras') or []} (metadata.json damvla.recipe.extra_cameras): the envs can render "
            "only cameras recorded by `damvla collect metaworld --extra-cameras`"
        )
    trained_camera, trained_res = recipe.get("camera"), recipe.get("resolution")
    if camera is not None and trained_camera is not None and camera != trained_camera:
        raise ValueError(
            f"--camera {camera!r} differs from the camera the checkpoint was trained on ({trained_camera!r}, "
            "metadata.json damvla.recipe.camera)"
        )
    if resolution is not None and trained_res is not None and int(resolution) != int(trained_res):
        raise ValueError(
            f"--resolution {resolution} differs from the training data's resolution ({trained_res}, "
            "metadata.json damvla.recipe.resolution)"
        )
    return EnvSetup(
        action_mapping=dict(mapping),
        camera=camera or trained_camera or DEFAULT_CAMERA,
        extra_cameras=extra,
        resolution=int(resolution or trained_res or DEFAULT_RESOLUTION),
        training_seeds=training_seeds(meta),
        sigma_lead=float(meta.get("sigma_lead") or cfg.weighting.sigma_lead),
        sigma_trail=float(meta.get("sigma_trail") or cfg.weighting.sigma_trail),
    )


# ---- initial states ------------------------------------------------------------------------------
def sample_initial_states(tasks: list[str], episodes: int, offset: int = 0) -> list[Any]:
    """``episodes`` initial states per task from the eval pool, tasks in order (no rendering)."""
    from damvla.envs.metaworld import MetaWorldEnv, initial_state_seeds

    seeds = initial_state_seeds("eval", episodes, offset)
    states = []
    for task in tasks:
        env = MetaWorldEnv(task, render=False)
        try:
            states.extend(env.sample_initial_state(s) for s in seeds)
        finally:
            env.close()
    return states


def read_initial_states(path: Path, tasks: list[str], episodes: int) -> list[Any]:
    """The first ``episodes`` states per task from an ``initial_states.jsonl`` of an earlier run."""
    from damvla.envs.base import InitialState

    if not path.is_file():
        raise FileNotFoundError(f"--initial-states {path} does not exist")
    by_task: dict[str, list[InitialState]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                s = InitialState.from_json(line)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not an initial state ({e})") from e
            by_task.setdefault(s.task, []).append(s)
    out = []
    for task in tasks:
        have = by_task.get(task, [])
        if len(have) < episodes:
            raise ValueError(f"{path}: {len(have)} initial states for {task}, --episodes asks for {episodes}")
        out.extend(have[:episodes])
    return out


def check_disjoint(states: list[Any], train: dict[str, set[int]]) -> None:
    """Refuse evaluation states whose seed a training episode of the same task used or tried."""
    from damvla.envs.metaworld import EVAL_SEED_OFFSET

    clash = [s.key for s in states if s.seed in train.get(s.task, set())]
    if clash:
        raise ValueError(
            f"{len(clash)} evaluation initial states were used in training (per the checkpoint's metadata), "
            f"e.g. {clash[:3]}; evaluate on the eval pool (seeds >= {EVAL_SEED_OFFSET})"
        )
    low = [s.key for s in states if s.seed < EVAL_SEED_OFFSET]
    if low:
        raise ValueError(f"initial states {low[:3]} are from the training seed pool (< {EVAL_SEED_OFFSET})")


# ---- provenance ----------------------------------------------------------------------------------
def resolved_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """The checkpoint folder a CHECKPOINT argument names (a run folder resolves through its ``latest``
    pointer), absolute, and its training step: from a ``step-XXXXXXX`` folder name, else the ``step`` that
    training records in metadata.json (a checkpoint copied elsewhere), else None."""
    from damvla.model.policy import resolve_checkpoint

    folder = resolve_checkpoint(path).resolve()
    m = re.fullmatch(r"step-(\d+)", folder.name)
    if m:
        return folder, int(m.group(1))
    try:
        step = json.loads((folder / "metadata.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    return folder, step if isinstance(step, int) and not isinstance(step, bool) else None


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a CUDA device this torch build or machine does not have (``ValueError`` naming it), before
    any model is loaded; ``cpu`` and ``auto`` always pass."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        built = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{flag} {device}: CUDA is not available ({built}; torch {torch.__version__})")
    _, _, index = device.partition(":")
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def versions() -> dict[str, Any]:
    """Versions of everything that changes results, and the git commit of the damvla source."""
    from importlib import metadata

    import torch

    import damvla

    out: dict[str, Any] = {"damvla": damvla.__version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "mujoco", "metaworld", "gymnasium", "diffusers", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["platform"] = platform.platform()
    root = Path(damvla.__file__).resolve().parents[2]
    out["git_commit"], out["git_dirty"] = None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no git: provenance is the version number alone
    return out


def canonical_command(opts: EvalOptions) -> str:
    """The run as one fully explicit command line (defaults spelled out), reproducing it exactly."""
    parts = ["damvla", "eval"]
    if opts.policy == "checkpoint" and opts.checkpoint:
        parts.append(str(opts.checkpoint))
    parts += [
        "--policy",
        opts.policy,
        "--suite",
        opts.suite,
        "--episodes",
        str(opts.episodes),
        "--out",
        str(opts.out),
    ]
    parts += ["--workers", str(opts.workers), "--seed", str(opts.seed), "--videos", str(opts.videos)]
    parts += ["--plots", str(opts.plots), "--device", opts.device]
    if opts.threads is not None:
        parts += ["--threads", str(opts.threads)]
    optional = {
        "--max-steps": opts.max_steps,
        "--execution": opts.execution,
        "--execute-steps": opts.execute_steps,
        "--ensemble-horizon": opts.ensemble_horizon,
        "--cfg-scale": opts.cfg_scale,
        "--inference-steps": opts.inference_steps,
        "--state-offset": opts.state_offset or None,
        "--initial-states": opts.initial_states,
        "--camera": opts.camera,
        "--resolution": opts.resolution,
        "--append-results": opts.append_results,
        "--title": opts.title,
        "--simpler-python": opts.simpler_python,
        "--simpler-shader": opts.simpler_shader,
    }
    for flag, value in optional.items():
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


# ---- the run -------------------------------------------------------------------------------------
def _default_title(opts: EvalOptions, policy: Any) -> str:
    if opts.policy == "checkpoint":
        name = Path(str(opts.checkpoint)).resolve().name
        return f"{name} ({policy.config.name}) on {opts.suite}, {opts.episodes} episodes per task"
    label = {"expert": "Scripted expert", "random": "Random policy"}[opts.policy]
    return f"{label} on {opts.suite}, {opts.episodes} episodes per task"


def _policy_and_env(opts: EvalOptions, tasks: list[str], folder: Path | None = None) -> tuple[Any, EnvSetup]:
    """Load and check the checkpoint (from ``folder``, its resolved folder, when given; or set up expert /
    random); no env process is started yet."""
    from damvla.envs.metaworld import DEFAULT_CAMERA, DEFAULT_RESOLUTION, dataset_action_mapping

    if opts.suite.startswith("simpler:"):
        return _simpler_policy_and_env(opts, tasks, folder)
    if opts.policy != "checkpoint":
        setup = EnvSetup(
            dataset_action_mapping(tasks),
            opts.camera or DEFAULT_CAMERA,
            int(opts.resolution or DEFAULT_RESOLUTION),
        )
        return None, setup
    import torch

    from damvla.model.policy import DAMVLAPolicy

    check_device(opts.device)
    if opts.threads is not None:
        # On a busy CPU one thread is often faster for a small model (no spin-waiting on taken cores).
        torch.set_num_threads(opts.threads)
    policy = DAMVLAPolicy.from_pretrained(folder or opts.checkpoint, device=opts.device)
    apply_sampling_overrides(policy, opts)
    return policy, check_checkpoint(policy, tasks, opts.camera, opts.resolution)


def apply_sampling_overrides(policy: Any, opts: EvalOptions) -> None:
    """--cfg-scale / --inference-steps replace the checkpoint's sampling settings (its diffusion config,
    which the sampler reads at every call) for this run; results.json records the values used."""
    if opts.cfg_scale is not None:
        policy.config.diffusion.cfg_scale = float(opts.cfg_scale)
    if opts.inference_steps is not None:
        policy.config.diffusion.inference_steps = int(opts.inference_steps)


def _simpler_policy_and_env(opts: EvalOptions, tasks: list[str], folder: Path | None) -> tuple[Any, EnvSetup]:
    """SIMPLER's counterpart of ``_policy_and_env`` (``damvla.evaluation.simpler``)."""
    from damvla.envs.simpler import DEFAULT_RESOLUTION
    from damvla.evaluation import simpler

    simpler.check_options(opts)
    robot = simpler.suite_robot(tasks)
    setup = EnvSetup({}, simpler.CAMERAS[robot], int(opts.resolution or DEFAULT_RESOLUTION))
    if opts.policy != "checkpoint":
        return None, setup
    import torch

    from damvla.model.policy import DAMVLAPolicy

    check_device(opts.device)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    policy = DAMVLAPolicy.from_pretrained(folder or opts.checkpoint, device=opts.device)
    apply_sampling_overrides(policy, opts)
    setup.notes = simpler.check_checkpoint(policy, robot)
    meta, w = policy.metadata, policy.config.weighting
    setup.sigma_lead = float(meta.get("sigma_lead") or w.sigma_lead)
    setup.sigma_trail = float(meta.get("sigma_trail") or w.sigma_trail)
    return policy, setup


def _make_executor(opts: EvalOptions, policy: Any, keys: list[str], tasks_of: list[str]) -> Any:
    from damvla.evaluation.executors import CheckpointExecutor, ExpertExecutor, RandomExecutor

    if opts.policy == "expert":
        return ExpertExecutor(keys, tasks_of, opts.seed)
    if opts.policy == "random":
        return RandomExecutor(keys, opts.seed)
    inference = policy.config.inference
    overrides = {
        "execution": opts.execution,
        "execute_steps": opts.execute_steps,
        "ensemble_horizon": opts.ensemble_horizon,
    }
    inference = replace(inference, **{k: v for k, v in overrides.items() if v is not None})
    if opts.suite.startswith("simpler:"):
        from damvla.evaluation.simpler import inference_for, suite_robot

        inference = inference_for(policy.config.inference, suite_robot(list(dict.fromkeys(tasks_of))), opts)
        return CheckpointExecutor(policy, keys, opts.seed, inference, binarize_gripper=False)
    return CheckpointExecutor(policy, keys, opts.seed, inference)


# ---- the output folder: refuse, clear, resume ----------------------------------------------------
# What `damvla eval` writes into --out; --overwrite removes exactly these (other files are left alone).
OUTPUT_FILES = ("results.json", "report.md", "index.html", "initial_states.jsonl", "episodes.jsonl",
                "command.txt", "versions.json", "run.json")  # fmt: skip
OUTPUT_DIRS = ("videos", "plots")
RUN_FILE = "run.json"  # what a --resume must match, written before the first episode
# Options an episode's outcome depends on: a --resume must repeat them (workers, threads, timeout, progress,
# title and --append-results may change).
RESUME_KEYS = ("suite", "episodes", "policy", "max_steps", "execution", "execute_steps", "ensemble_horizon",
               "cfg_scale", "inference_steps", "seed", "state_offset", "videos", "plots", "device", "camera", "resolution")  # fmt: skip
# Versions whose change can change an episode: a --resume refuses to mix results across them.
RESUME_VERSIONS = ("damvla", "torch", "numpy", "mujoco", "metaworld", "gymnasium", "git_commit")


class EvalInterrupted(Exception):
    """SIGINT during ``evaluate``: the finished episodes are recorded and ``results.json`` holds them with
    ``"complete": false``; the message says how many and how to continue."""


def check_out(opts: EvalOptions) -> None:
    """Refuse a non-empty ``--out`` unless ``--resume`` (which needs an interrupted run there) or
    ``--overwrite``; nothing is deleted here (``clear_out`` does, once every other check passed)."""
    out = Path(opts.out)
    if opts.resume and opts.overwrite:
        raise ValueError("--resume continues the evaluation in --out, --overwrite replaces it: pick one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if opts.resume:
        if not (out / RUN_FILE).is_file():
            raise ValueError(f"--resume: {out / RUN_FILE} not found; {out} holds no evaluation to continue")
        return
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        done = ""
        res = out / "results.json"
        if res.is_file():
            try:
                doc = json.loads(res.read_text())
                n = len(doc.get("episodes") or [])
                done = f" ({n} episodes{'' if doc.get('complete', True) else ', interrupted'})"
            except (OSError, ValueError):
                pass
        raise ValueError(
            f"--out {out} is not empty{done}: pass --resume to continue an interrupted evaluation there, "
            "--overwrite to replace it, or choose another folder"
        )


def clear_out(out: Path) -> None:
    """Remove what an earlier evaluation wrote into ``out`` (``OUTPUT_FILES``, ``OUTPUT_DIRS``)."""
    import shutil

    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for tmp in out.glob("*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _resume_state(opts: EvalOptions, ckpt_folder: Path | None, vers: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` records and a ``--resume`` must match."""
    o = asdict(opts)
    return {
        "options": {k: o[k] for k in RESUME_KEYS},
        "checkpoint_folder": str(ckpt_folder) if ckpt_folder is not None else None,
        "versions": {k: vers.get(k) for k in RESUME_VERSIONS},
    }


def check_resume(out: Path, state: dict[str, Any]) -> None:
    """Refuse a ``--resume`` whose options, checkpoint or versions differ from the interrupted run's."""
    path = out / RUN_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read {path} ({e})") from e
    diffs = []
    for k in RESUME_KEYS:
        a, b = old.get("options", {}).get(k), state["options"][k]
        if a != b:
            diffs.append(f"--{k.replace('_', '-')} {b!r} (the interrupted run: {a!r})")
    if old.get("checkpoint_folder") != state["checkpoint_folder"]:
        diffs.append(f"checkpoint {state['checkpoint_folder']} (the interrupted run: {old.get('checkpoint_folder')}; "
                     "name that step folder)")  # fmt: skip
    for k in RESUME_VERSIONS:
        a, b = old.get("versions", {}).get(k), state["versions"][k]
        if a != b:
            diffs.append(f"{k} {b} (the interrupted run: {a})")
    if diffs:
        raise ValueError(
            f"--resume: this run differs from the interrupted one in {path}: " + "; ".join(diffs)
            + ". Episodes from both would be mixed: repeat the interrupted run's options, or use --overwrite"
        )


def read_journal(path: Path, keys: set[str]) -> dict[str, dict[str, Any]]:
    """The finished episodes of ``episodes.jsonl`` by key. A torn last line (a crash mid-write) is dropped
    and cut from the file; any other unreadable line is an error naming the file and line."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    out: dict[str, dict[str, Any]] = {}
    good = 0  # bytes of complete, parsed lines
    for n, raw in enumerate(lines, 1):
        last = n == len(lines)
        if not raw.strip():
            good += len(raw) + (0 if last else 1)
            continue
        try:
            rec = json.loads(raw)
            if last:  # no newline after it: the write did not finish
                raise ValueError("no newline")
        except ValueError as e:
            if last or all(not x.strip() for x in lines[n:]):
                break
            raise ValueError(f"{path}:{n}: not an episode record ({e}); remove the line or use --overwrite") from e
        if rec.get("key") not in keys:
            raise ValueError(f"{path}:{n}: episode {rec.get('key')!r} is not one of this evaluation's episodes")
        out.setdefault(rec["key"], rec)
        good += len(raw) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return out


class Journal:
    """``episodes.jsonl`` while the run goes: one line per finished episode, appended with one write and
    fsynced, so an interruption keeps every episode that ended before it."""

    def __init__(self, path: Path) -> None:
        import os

        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        import os

        os.write(self._fd, (json.dumps(record) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _SigintDeferred:
    """Hold SIGINT off while the results are written (a second Ctrl-C must not tear them)."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def evaluate(opts: EvalOptions, invoked_as: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation of ``opts`` and write the output folder; returns the ``results.json`` dict.

    Each episode is appended to ``episodes.jsonl`` as it ends. SIGINT (KeyboardInterrupt) stops the
    run, writes ``results.json`` of the finished episodes with ``"complete": false`` and raises
    ``EvalInterrupted``; ``opts.resume`` continues it, running only the episodes not recorded."""
    import damvla.envs  # noqa: F401  (MUJOCO_GL=egl before mujoco is imported)
    from damvla.atomic import write_json_atomic
    from damvla.envs.metaworld import resolve_suite
    from damvla.envs.rollout import RolloutSpec, rollout

    opts.validate()
    check_out(opts)
    is_simpler = opts.suite.startswith("simpler:")
    if is_simpler:
        from damvla.envs import simpler as simpler_env

        tasks = simpler_env.resolve_suite(opts.suite)
    else:
        tasks = resolve_suite(opts.suite)
    # Resolved once: a run folder whose `latest` moves on mid-evaluation still records the checkpoint that ran.
    ckpt_folder, ckpt_step = resolved_checkpoint(opts.checkpoint) if opts.policy == "checkpoint" else (None, None)
    vers = versions()
    state = _resume_state(opts, ckpt_folder, vers)
    out = Path(opts.out)
    if opts.resume:
        check_resume(out, state)
    policy, setup = _policy_and_env(opts, tasks, ckpt_folder)
    if opts.resume:
        states = read_initial_states(out / "initial_states.jsonl", tasks, opts.episodes)
    elif opts.initial_states is not None:
        states = read_initial_states(Path(opts.initial_states), tasks, opts.episodes)
    elif is_simpler:
        states = simpler_env.sample_initial_states(tasks, opts.episodes, opts.state_offset)
    else:
        states = sample_initial_states(tasks, opts.episodes, opts.state_offset)
    if not is_simpler:  # SIMPLER policies learn from real-robot data: no simulator seeds to overlap
        check_disjoint(states, setup.training_seeds)
    simpler_info = _simpler_info(opts, tasks, states, setup.notes) if is_simpler else None

    command = canonical_command(opts)
    if not opts.resume:
        if out.is_dir():
            clear_out(out)  # --overwrite (check_out refused a non-empty folder without it)
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(
            command + "\n" + (f"# invoked as: {shlex.join(invoked_as)}\n" if invoked_as else "")
        )
        (out / "versions.json").write_text(json.dumps(vers, indent=2) + "\n")
        (out / "initial_states.jsonl").write_text("".join(s.to_json() + "\n" for s in states))
        write_json_atomic(out / RUN_FILE, state)
    elif invoked_as:
        with (out / "command.txt").open("a") as f:
            f.write(f"# resumed as: {shlex.join(invoked_as)}\n")

    per_task_index = {t: 0 for t in tasks}
    specs, position = [], []
    for s in states:
        k = per_task_index[s.task]
        per_task_index[s.task] += 1
        position.append(k)
        spec = RolloutSpec(
            s.task,
            s,
            camera=setup.camera,
            extra_cameras=tuple(setup.extra_cameras),
            resolution=setup.resolution,
            max_steps=opts.max_steps,
            action_mapping=setup.action_mapping,
            record_frames=k < opts.videos,
            # Expert and random never look at the image: render only the episodes filmed.
            render=opts.policy == "checkpoint" or k < opts.videos,
        )
        if is_simpler:  # SIMPLER renders every step; success is judged at the time limit
            spec = replace(
                spec,
                camera=None,
                action_mapping=None,
                render=True,
                stop_on_success=False,
                success_at_end=True,
                env_options=(("python", opts.simpler_python), ("shader", opts.simpler_shader)),
            )
        specs.append(spec)
    index_of = {s.initial_state.key: i for i, s in enumerate(specs)}
    if len(index_of) != len(specs):
        raise ValueError("the initial states repeat an episode key (task/seed-N); each episode must be distinct")
    journal_path = out / "episodes.jsonl"
    done = read_journal(journal_path, set(index_of)) if opts.resume else {}
    todo = [i for i, s in enumerate(specs) if s.initial_state.key not in done]
    slot_of = {i: j for j, i in enumerate(todo)}  # spec index -> its episode_index in this rollout
    ran: set[str] = set()  # keys of the episodes this invocation ran
    executor = _make_executor(opts, policy, [specs[i].initial_state.key for i in todo], [specs[i].task for i in todo])
    recorder = _Recorder(opts, setup, out, Journal(journal_path))

    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), initial=len(done), desc=f"eval {opts.policy}", unit="ep", file=sys.stderr)
    succ = [sum(bool(r["success"]) for r in done.values())]

    def progress(res: Any) -> None:
        i = index_of[res.key]
        j = slot_of[i]
        done[res.key] = recorder.record(specs[i], position[i], res, executor.logs.get(j))
        ran.add(res.key)
        succ[0] += int(res.success)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(success=f"{succ[0]}/{bar.n}")

    t0 = time.perf_counter()
    try:
        try:
            rollout(
                executor,
                [specs[i] for i in todo],
                num_workers=opts.workers,
                progress=progress,
                privileged=executor.needs_privileged,
                timeout_s=opts.timeout,
            )
            for i in todo:  # every spec gets a result; kept for safety: a missing one is recorded as such
                key = specs[i].initial_state.key
                if key not in done:
                    done[key] = recorder.record(specs[i], position[i], None, executor.logs.get(slot_of[i]))
        finally:
            if bar is not None:
                bar.close()
            recorder.close()
    except KeyboardInterrupt:
        with _SigintDeferred():
            doc = _results_doc(opts, setup, policy, executor, specs, done, tasks, states, command, vers,
                               time.perf_counter() - t0, ckpt_folder, ckpt_step, ran, simpler_info)  # fmt: skip
            write_json_atomic(out / "results.json", doc)
        raise EvalInterrupted(
            f"interrupted: {len(done)} of {len(specs)} episodes finished, recorded in {journal_path}; "
            f"{out / 'results.json'} holds them with \"complete\": false. Continue with the same command "
            "and --resume"
        ) from None

    from damvla.evaluation import report

    with _SigintDeferred():
        doc = _results_doc(opts, setup, policy, executor, specs, done, tasks, states, command, vers,
                           time.perf_counter() - t0, ckpt_folder, ckpt_step, ran, simpler_info)  # fmt: skip
        # The journal is in finishing order; the final file is in episode order, like results.json.
        tmp = journal_path.with_name(journal_path.name + ".tmp-final")
        tmp.write_text("".join(json.dumps(done[s.initial_state.key]) + "\n" for s in specs))
        tmp.replace(journal_path)
        title = opts.title or _default_title(opts, policy)
        report.write_results(out, doc, title)
        if opts.append_results is not None:
            report.append_section(opts.append_results, title, report.render_markdown(doc, title))
    return doc


def _results_doc(
    opts: EvalOptions, setup: EnvSetup, policy: Any, executor: Any, specs: list[Any],
    done: dict[str, dict[str, Any]], tasks: list[str], states: list[Any], command: str,
    vers: dict[str, Any], wall: float, ckpt_folder: Path | None, ckpt_step: int | None, ran: set[str],
    simpler_info: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The ``results.json`` dict of the episodes in ``done`` (all of them, or the finished ones of an
    interrupted run: then ``complete`` is false and the per-task counts cover only those)."""
    from damvla.evaluation.stats import EpisodeRecord, summarize

    episodes = [
        {k: v for k, v in done[s.initial_state.key].items() if k not in ("log", "router_label")}
        for s in specs
        if s.initial_state.key in done
    ]
    records = [
        EpisodeRecord(e["task"], e["success"], e["steps"], e["error"], e["policy_seconds"], e["env_seconds"])
        for e in episodes
    ]
    summary = summarize(records, tasks)
    add_milestones(summary, episodes, tasks)
    add_goal_distances(summary, episodes, tasks)
    add_hand_distances(summary, episodes, tasks)
    from damvla.evaluation.placement import splits

    placed = splits(episodes, {(st.task, st.seed): st.data for st in states})
    # timing covers this invocation: the episodes it ran (a resumed run's earlier ones ran in another)
    total_steps = sum(e["steps"] for e in episodes if e["key"] in ran)
    cfg = {
        **{
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(opts).items()
            if k not in ("progress", "resume", "overwrite")
        },
        "tasks": tasks,
        "camera": setup.camera,
        "extra_cameras": setup.extra_cameras,
        "resolution": setup.resolution,
        "initial_states": "initial_states.jsonl",
    }
    if simpler_info is not None:
        cfg.update(simulator="simpler", simpler=simpler_info)
    if opts.policy == "checkpoint":
        inf = executor.inference
        cfg.update(
            execution=inf.execution,
            execute_steps=inf.execute_steps,
            ensemble_horizon=inf.ensemble_horizon,
            routing=inf.routing,
            cfg_scale=policy.config.diffusion.cfg_scale,
            inference_steps=policy.config.diffusion.inference_steps,
            preset=policy.config.name,
            ablation=asdict(policy.config.ablation),
            checkpoint=str(Path(opts.checkpoint).resolve()),
        )
        # A run folder resolves to its latest checkpoint: record which one ran, and at which step.
        cfg.update(checkpoint_folder=str(ckpt_folder), checkpoint_step=ckpt_step)
    else:
        cfg.update(execution=None, execute_steps=None, ensemble_horizon=None)
    return {
        "complete": len(episodes) == len(specs),
        "episodes_planned": len(specs),
        "command": command,
        "config": cfg,
        "seeds": {
            "noise_seed": opts.seed,
            "noise": "one torch/numpy generator per episode, seeded from (seed, episode key)",
            "initial_state_seeds": {t: [s.seed for s in states if s.task == t] for t in tasks},
        },
        "tasks": summary["tasks"],
        "overall": summary["overall"],
        "timing": {
            "wall_seconds": wall,
            "env_steps": total_steps,
            "env_steps_per_s_wall": total_steps / wall if wall > 0 else 0.0,
            "policy_calls": executor.calls,
            "episodes_run": len(ran),
            "episodes_resumed": len(episodes) - len(ran),
        },
        "versions": vers,
        # where in the workspace episodes fail (damvla.evaluation.placement); [] without recorded positions
        "placement": [asdict(p) for p in placed],
        "episodes": episodes,
    }


def _simpler_info(opts: EvalOptions, tasks: list[str], states: list[Any], notes: dict[str, Any]) -> dict[str, Any]:
    """What results.json records of a SIMPLER run beyond the Meta-World fields."""
    from damvla.envs.simpler import ENSEMBLE_HORIZON, protocol_size
    from damvla.envs.simpler_suites import NAMED_SUITES, PAPER_TABLE, SUITE_ALIASES
    from damvla.evaluation.simpler import server_versions, suite_robot

    body = opts.suite.split(":", 1)[1]
    name = SUITE_ALIASES.get(body, body)
    robot = suite_robot(tasks)
    truncated = {}
    for t in tasks:
        n, size = sum(s.task == t for s in states), protocol_size(t)
        if size is not None and n < size:
            truncated[t] = (n, size)
    return {
        "robot": robot,
        "named_suite": name if name in NAMED_SUITES else None,
        "paper_table": PAPER_TABLE.get(name),
        "shader": opts.simpler_shader,
        "conventions": {
            "rotation": "euler xyz deltas -> axis-angle (transforms3d euler2axangle)",
            "gripper": "sticky relative, held 10 steps" if robot == "google_robot" else "+1 open / -1 closed at 0.5",
            "resize": "area averaging to the env resolution, aspect ratio not kept",
            "ensemble_horizon_default": ENSEMBLE_HORIZON[robot],
            "success": "at the last step of the episode (SimplerEnv)",
        },
        "truncated": truncated,
        "checkpoint_checks": notes,
        "server": server_versions(opts.simpler_python),
    }


def add_milestones(summary: dict[str, Any], episodes: list[dict[str, Any]], tasks: list[str]) -> None:
    """Per task and overall: how many episodes reached each milestone the env reports (``Env.step``), in
    the env's order, with success last. Only where the env reports milestones."""
    names = list(dict.fromkeys(n for e in episodes for n in e.get("milestones", {})))
    if not names:
        return
    for task in tasks:
        eps = [e for e in episodes if e["task"] == task]
        counts = {n: sum(bool(e["milestones"].get(n)) for e in eps) for n in names}
        summary["tasks"][task]["milestones"] = {**counts, "success": sum(bool(e["success"]) for e in eps)}
    total = {n: sum(summary["tasks"][t]["milestones"][n] for t in tasks) for n in [*names, "success"]}
    summary["overall"]["milestones"] = total


def add_goal_distances(summary: dict[str, Any], episodes: list[dict[str, Any]], tasks: list[str]) -> None:
    """Per task and overall, over the *failed* episodes: the median closest and final object-to-goal
    distance [cm] (``Env.step``'s ``goal_distance``), and where the env reports which way the object missed,
    the median object-minus-goal offset [cm] per axis at the closest step. Only where the env reports it."""

    def medians(eps: list[dict[str, Any]]) -> dict[str, Any]:
        d = [e["goal_distance"] for e in eps if not e["success"] and e.get("goal_distance")]
        out: dict[str, Any] = {"failed": len(d)}
        for k in ("min", "final"):
            out[f"median_{k}_cm"] = round(100 * float(np.median([x[k] for x in d])), 1) if d else None
        offsets = [x["offset_min"] for x in d if x.get("offset_min") is not None]
        if offsets:  # per axis: a systematic miss (e.g. always too low) shows as a median far from 0
            out["median_offset_min_cm"] = [round(100 * float(v), 1) for v in np.median(np.asarray(offsets), axis=0)]
        return out

    if not any(e.get("goal_distance") for e in episodes):
        return
    for task in tasks:
        summary["tasks"][task]["goal_distance_failed"] = medians([e for e in episodes if e["task"] == task])
    summary["overall"]["goal_distance_failed"] = medians(episodes)


def add_hand_distances(summary: dict[str, Any], episodes: list[dict[str, Any]], tasks: list[str]) -> None:
    """Per task and overall, over the episodes whose hand never reached the object (the env's ``reached``
    milestone unset; every failed episode where the env has no such flag): the median closest hand-to-object
    distance [cm] and the median hand-minus-object offset [cm] per axis at that step (``Env.step``'s
    ``hand_offset``). A perception failure (the hand goes to the wrong place) shows as a large offset on an
    axis; a hand that stops short shows as a small one. Only where the env reports it."""

    def medians(eps: list[dict[str, Any]]) -> dict[str, Any]:
        d = [e["hand_object"] for e in eps
             if not e["success"] and e.get("hand_object") and not e.get("milestones", {}).get("reached", False)]  # fmt: skip
        out: dict[str, Any] = {"unreached": len(d), "median_min_cm": None, "median_offset_min_cm": None}
        if d:
            out["median_min_cm"] = round(100 * float(np.median([x["min"] for x in d])), 1)
            out["median_offset_min_cm"] = [round(100 * float(v), 1) for v in np.median([x["offset_min"] for x in d], axis=0)]
        return out

    if not any(e.get("hand_object") for e in episodes):
        return
    for task in tasks:
        summary["tasks"][task]["hand_object_unreached"] = medians([e for e in episodes if e["task"] == task])
    summary["overall"]["hand_object_unreached"] = medians(episodes)


class _Recorder:
    """Turns each finished episode into its record (video, router plot, ``episodes.jsonl`` line) as it ends."""

    def __init__(self, opts: EvalOptions, setup: EnvSetup, out: Path, journal: Journal) -> None:
        from damvla.evaluation.phases import ExpertReplay

        self.opts, self.setup, self.out, self.journal = opts, setup, out, journal
        # The expert replay runs to its own end (task time limit), not to --max-steps: the plot shows the
        # demonstration's whole phase sequence next to however far the policy got.
        self.simpler = opts.suite.startswith("simpler:")  # no scripted expert to replay; SimplerEnv's video rate
        self.replay = ExpertReplay() if opts.policy != "expert" and opts.plots != 0 and not self.simpler else None
        self.fps = 5 if self.simpler else VIDEO_FPS

    def record(self, spec: Any, k: int, res: Any, log: Any) -> dict[str, Any]:
        """The record of ``spec`` (the ``k``-th episode of its task) from its result ``res`` (None: no
        result) and executor log; written to the journal before it is returned."""
        from damvla.evaluation.executors import EpisodeLog
        from damvla.evaluation.phases import executed_labels
        from damvla.evaluation.plots import plot_router
        from damvla.evaluation.video import annotate_frames, write_mp4

        opts, setup, out = self.opts, self.setup, self.out
        log = log if log is not None else EpisodeLog()
        st = spec.initial_state
        steps = res.steps if res is not None else 0
        # The last logged action of a failed step was never executed: trim to executed steps.
        n = min(steps, len(log.gripper))
        grip = np.asarray(log.gripper[:n])
        w = np.asarray(log.router_weight[:n], dtype=np.float64)
        labels = executed_labels(grip, setup.sigma_lead, setup.sigma_trail)
        ep: dict[str, Any] = {
            "task": spec.task,
            "seed": st.seed,
            "key": st.key,
            "success": bool(res.success) if res is not None else False,
            "steps": steps,
            "error": res.error if res is not None else "no result",
            "policy_seconds": log.policy_seconds,
            "env_seconds": res.env_seconds if res is not None else 0.0,
            "gripper_flips": int(np.count_nonzero(np.diff(grip))) if n > 1 else 0,
            "router_weight_mean": float(np.nanmean(w)) if n and np.isfinite(w).any() else None,
            "gripper_head_fraction": float(np.mean(np.asarray(log.head[:n]) == 1)) if n else None,
            "milestones": dict(res.info.get("milestones", {})) if res is not None else {},
            "goal_distance": res.info.get("goal_distance") if res is not None else None,
            "hand_object": res.info.get("hand_object") if res is not None else None,
            **({"instruction": res.info.get("instruction"), "reset_info": res.info.get("reset_info", {})}
               if self.simpler and res is not None else {}),  # fmt: skip
            "video": None,
            "plot": None,
        }
        name = f"{spec.task}/seed-{st.seed}"
        if res is not None and res.frames is not None and len(res.frames) and k < opts.videos:
            m = min(len(res.frames), n) if n else len(res.frames)
            frames = annotate_frames(
                res.frames[:m],
                w[:m] if n else np.full(m, np.nan),
                grip[:m] if n else np.ones(m),
                label=f"{spec.task} seed {st.seed} {'success' if ep['success'] else 'fail'}",
            )
            ep["video"] = str(write_mp4(out / "videos" / f"{name}.mp4", frames, self.fps).relative_to(out))
        if opts.plots < 0 or k < opts.plots:
            if self.replay is not None:
                expert_grip, _ = self.replay.gripper_commands(st)
                expert_labels = executed_labels(expert_grip, setup.sigma_lead, setup.sigma_trail)
            else:
                expert_labels = labels  # the policy is the expert: same trajectory, same labels
            title = f"{name}: {'success' if ep['success'] else 'failure'} in {steps} steps ({opts.policy})"
            path = plot_router(out / "plots" / f"{name}.png", title, w, labels, expert_labels, grip)
            ep["plot"] = str(path.relative_to(out))
        line = {**ep, "log": log.to_dict(), "router_label": labels.tolist()}
        self.journal.append(line)
        return line

    def close(self) -> None:
        self.journal.close()
        if self.replay is not None:
            replay, self.replay = self.replay, None
            replay.close()


# ---- command line --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="checkpoint folder (config.json, model.safetensors, normalization.json, metadata.json); "
        "not needed for --policy expert / random",
    )
    p.add_argument("--suite", required=True, help="mt10 | mt50 | grip | comma-separated task names")
    p.add_argument("--episodes", type=int, required=True, help="episodes per task")
    p.add_argument(
        "--out", type=Path, required=True,
        help="output folder; must be empty or new unless --resume or --overwrite",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted evaluation in --out: run only the episodes not yet recorded in its "
        "episodes.jsonl (same options, checkpoint and versions required)",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the evaluation in a non-empty --out: its results, reports, episodes, videos and plots "
        "are deleted first",
    )
    p.add_argument(
        "--policy", choices=POLICIES, default=None, help="default: checkpoint if given, else an error"
    )
    p.add_argument("--workers", type=int, default=2, help="env worker processes (0: in-process; default 2)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="episode time limit (default: the task's, 500)"
    )
    p.add_argument(
        "--execution", choices=EXECUTIONS, default=None, help="action execution (default: checkpoint's)"
    )
    p.add_argument("--execute-steps", type=int, default=None, help="chunk mode: actions executed per chunk")
    p.add_argument("--ensemble-horizon", type=int, default=None, help="ensembles: chunks averaged")
    p.add_argument(
        "--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: checkpoint's; 1 = off)"
    )
    p.add_argument("--inference-steps", type=int, default=None, help="DDIM steps (default: checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="diffusion-noise / random-policy seed (default 0)")
    p.add_argument("--state-offset", type=int, default=0, help="first index into the eval initial-state pool")
    p.add_argument(
        "--initial-states", type=Path, default=None, help="initial_states.jsonl of an earlier run to replay"
    )
    p.add_argument(
        "--videos", type=int, default=1, help="mp4 videos of the first K episodes per task (default 1)"
    )
    p.add_argument(
        "--plots", type=int, default=-1, help="router plots of the first K episodes per task (-1: all)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (policy inference)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for inference (default: torch's)"
    )
    p.add_argument("--camera", default=None, help="env camera (default: the checkpoint's training camera)")
    p.add_argument(
        "--resolution", type=int, default=None, help="env image size (default: the training data's)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a worker may take per reset / step")
    p.add_argument(
        "--append-results", type=Path, default=None, help="write the report as a section of this page"
    )
    p.add_argument("--title", default=None, help="report / section title (default: policy, suite, episodes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--simpler-python",
        default=None,
        help="SIMPLER: the Python that has SimplerEnv installed (default: $DAMVLA_SIMPLER_PYTHON; docs/simpler.md)",
    )
    p.add_argument(
        "--simpler-shader",
        choices=("ibl", "rt", "default"),
        default=None,
        help="SIMPLER: replace the protocol's shader (ibl renders on a CPU; results then differ from the paper's)",
    )


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    policy = args.policy or ("checkpoint" if args.checkpoint else None)
    if policy is None:
        raise ValueError("give a CHECKPOINT folder, or --policy expert / --policy random")
    if policy != "checkpoint" and args.checkpoint:
        print(f"damvla eval: --policy {policy} ignores the checkpoint {args.checkpoint}", file=sys.stderr)
    return EvalOptions(
        suite=args.suite,
        episodes=args.episodes,
        out=args.out,
        checkpoint=args.checkpoint if policy == "checkpoint" else None,
        policy=policy,
        workers=args.workers,
        max_steps=args.max_steps,
        execution=args.execution,
        execute_steps=args.execute_steps,
        ensemble_horizon=args.ensemble_horizon,
        cfg_scale=args.cfg_scale,
        inference_steps=args.inference_steps,
        seed=args.seed,
        state_offset=args.state_offset,
        initial_states=args.initial_states,
        videos=args.videos,
        plots=args.plots,
        device=args.device,
        threads=args.threads,
        camera=args.camera,
        resolution=args.resolution,
        timeout=args.timeout,
        append_results=args.append_results,
        title=args.title,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
        simpler_python=args.simpler_python,
        simpler_shader=args.simpler_shader,
    ).validate()


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    try:
        res = evaluate(opts, invoked_as=["damvla", *sys.argv[1:]] if Path(sys.argv[0]).name == "damvla" else None)
    except EvalInterrupted as e:
        print(f"damvla eval: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first episode started: nothing to keep
        print("damvla eval: interrupted before any episode ran; nothing recorded", file=sys.stderr)
        return 130
    ov = res["overall"]
    lo, hi = ov["wilson95"]
    for task, s in res["tasks"].items():
        err = f", {s['errors']} errors" if s["errors"] else ""
        print(f"{task:<32} {s['successes']:>3}/{s['episodes']:<3} {100 * s['success_rate']:5.1f}%{err}")
    print(
        f"average success {100 * ov['success_rate']:.1f}% ({ov['successes']}/{ov['episodes']}, Wilson 95% "
        f"[{100 * lo:.1f}, {100 * hi:.1f}]), {ov['errors']} errors -> {opts.out / 'report.md'}, {opts.out / 'index.html'}"
    )
    return 0
