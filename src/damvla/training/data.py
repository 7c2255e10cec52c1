"""Training data: the dataset checked against the config, a resumable distributed sampler, and
per-sample training draws (diffusion noise, timesteps, condition dropout).

Determinism by design: epoch e's global sample order depends only on (seed, e); an optimiser step takes
the next ``global_batch`` positions of it, rank r taking every world-th one (DistributedSampler's split);
and each sample's draws come from its own generator seeded by (seed, epoch, position). So a run is the
same whatever the number of processes, accumulation micro-steps or DataLoader workers, and a resumed run
continues exactly (it only needs epoch and position to restart the stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from damvla.config import PolicyConfig
from damvla.data.dataset import PolicyDataset
from damvla.data.lerobot import CAMERA_DTYPES, DatasetError, LeRobotDatasetReader
from damvla.diffusion import TrainingDraws
from damvla.keys import ENV_STATE_KEY, STATE_KEY, image_key

SEED_KEY = "_sample_seed"  # extra batch key: each sample's draw seed (int64), popped before the forward


def split_episodes(episodes: list[int], num_val: int) -> tuple[list[int], list[int]]:
    """(train, validation) episode indices: ``num_val`` evenly spaced episodes are held out (datasets
    collected task after task then hold out every task alike). Independent of the training seed, so every
    seed of a comparison validates on the same episodes."""
    if num_val <= 0:
        return list(episodes), []
    if num_val >= len(episodes):
        raise ValueError(f"--val-episodes {num_val}: the dataset has only {len(episodes)} episodes")
    step = len(episodes) / num_val
    val = sorted({episodes[int(step * (i + 0.5))] for i in range(num_val)})
    return [e for e in episodes if e not in set(val)], val


def state_stats(ds: PolicyDataset, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``observation.state`` (or the feature ``key``) from the dataset's meta/stats.json
    (LeRobot's stats)."""
    key = key or ds.state_key
    st = ds.reader.stats.get(key)
    if st is None or "mean" not in st or "std" not in st:
        raise ValueError(f"dataset {ds.root}: meta/stats.json has no mean/std for {key!r}, needed to normalise it")
    return np.asarray(st["mean"], dtype=np.float32).ravel(), np.asarray(st["std"], dtype=np.float32).ravel()


def build_dataset(root: str, cfg: PolicyConfig, episodes: list[int] | None = None) -> PolicyDataset:
    """The dataset at ``root`` as this policy config reads it; raises ``ValueError`` naming any mismatch
    between the two (action dimension, camera, gripper index, image size, horizon, stats) before training."""
    reader = LeRobotDatasetReader(root)  # raises for a missing / incomplete dataset
    cam_keys = camera_keys(reader, cfg, root)
    if "action" not in reader.features:
        raise ValueError(f"dataset {root} has no 'action' feature (have {sorted(reader.features)})")
    d = int(np.prod(reader.features["action"]["shape"]))
    if d != cfg.action_dim:
        raise ValueError(
            f"action dimension mismatch: dataset {root} has action shape {reader.features['action']['shape']} "
            f"({d} dims) but the config has action_dim={cfg.action_dim}; pass the override action_dim={d} "
            f"(and gripper_index=<dim> or gripper_index=null)"
        )
    info_gi = (reader.info.get("damvla") or {}).get("gripper_index")
    gi = cfg.gripper_index
    if info_gi is not None and (gi is None or int(info_gi) % d != gi):
        raise ValueError(
            f"gripper index mismatch: dataset {root} (meta/info.json damvla.gripper_index) says {info_gi}, the config "
            f"says gripper_index={gi}; pass the override gripper_index={info_gi}"
        )
    try:
        # The raw open/closed threshold is the dataset's (info.json or the midpoint of the two levels);
        # config.gripper_threshold is about the model's binary output.
        ds = PolicyDataset(
            root, horizon=cfg.horizon, image_size=cfg.vision.image_size, camera=cam_keys, gripper_index=gi,
            sigma_lead=cfg.weighting.sigma_lead, sigma_trail=cfg.weighting.sigma_trail, episodes=episodes,
            # Routing labels and trajectory weights are read only by the router (DAM) and TW; the CogACT
            # baseline trains on a dataset without any gripper or phase signal.
            require_routing=cfg.ablation.dam or cfg.ablation.tw,
            env_state_key=env_state_key(reader, cfg, root),
        )  # fmt: skip
    except DatasetError as e:
        raise ValueError(f"dataset {root}: {e}") from e
    sample = ds[0]  # one decode serves every check below
    check_sample(sample, cfg, root)
    if episodes is None:
        check_prompts(reader.tasks, cfg, root)
    if cfg.state_dim and tuple(sample[STATE_KEY].shape) != (cfg.state_dim,):
        raise ValueError(f"dataset {root}: {STATE_KEY} has shape {tuple(sample[STATE_KEY].shape)}, "
                         f"the config has state_dim={cfg.state_dim}")  # fmt: skip
    if cfg.env_state_dim and tuple(sample[ENV_STATE_KEY].shape) != (cfg.env_state_dim,):
        raise ValueError(f"dataset {root}: {ENV_STATE_KEY} has shape {tuple(sample[ENV_STATE_KEY].shape)}, "
                         f"the config has env_state_dim={cfg.env_state_dim}")  # fmt: skip
    return ds


def camera_keys(reader: LeRobotDatasetReader, cfg: PolicyConfig, root: str) -> list[str]:
    """The dataset's feature keys of the config's cameras (``vision.cameras``), checked to exist."""
    keys = []
    for cam in cfg.vision.cameras:
        key = cam if cam in reader.features else image_key(cam)
        if key not in reader.features or reader.features[key]["dtype"] not in CAMERA_DTYPES:
            field = "vision.camera" if cam == cfg.vision.camera else "vision.extra_cameras"
            value = cam if cam == cfg.vision.camera else cfg.vision.extra_cameras
            raise ValueError(
                f"dataset {root} has no camera {key!r} (config {field}={value!r}); its cameras: "
                f"{reader.camera_keys}. Pick one with the override vision.camera=<name> (vision.extra_cameras='[\"<name>\", ...]')"
            )
        keys.append(key)
    return keys


def env_state_key(reader: LeRobotDatasetReader, cfg: PolicyConfig, root: str) -> str | None:
    """The environment-state feature the config trains on (``env_state_dim`` > 0), checked to exist."""
    if not cfg.env_state_dim:
        return None
    if ENV_STATE_KEY not in reader.features:
        raise ValueError(
            f"dataset {root} has no {ENV_STATE_KEY!r}, the target of env_state_dim={cfg.env_state_dim}: collect it "
            f"with `damvla collect metaworld --environment-state` (or a LeRobot dataset that has it), or pass "
            f"env_state_dim=0"
        )
    return ENV_STATE_KEY


def check_prompts(tasks: list[str], cfg: PolicyConfig, root: str) -> None:
    """Every task's prompt fits ``language.max_prompt_tokens``: refused before training, not at the first
    batch that draws the longest task."""
    from damvla.model.language import prompt_token_ids
    from damvla.model.tokenizer import load_tokenizer

    lang = cfg.language
    tok = load_tokenizer(lang.tokenizer, lang.pretrained_path)
    lengths = {t: len(prompt_token_ids(lang, tok, t)) for t in tasks}
    over = [t for t, n in lengths.items() if n > lang.max_prompt_tokens]
    if over:
        longest = max(over, key=lengths.__getitem__)
        raise ValueError(
            f"dataset {root}: {len(over)} task(s) make prompts longer than language.max_prompt_tokens="
            f"{lang.max_prompt_tokens}, the longest {longest[:60]!r} ({lengths[longest]} tokens); pass the override "
            f"language.max_prompt_tokens={lengths[longest]}"
        )


def check_sample(x: dict[str, Any], cfg: PolicyConfig, root: str) -> None:
    """One sample against what the policy expects (shapes in docs/CONTRACTS.md)."""
    s, h, d = cfg.vision.image_size, cfg.horizon, cfg.action_dim
    want = {image_key(c): (3, s, s) for c in cfg.vision.cameras}
    want |= {"action": (h, d), "action_is_pad": (h,), "trajectory_weight": (h,), "router_label": ()}
    for k, shape in want.items():
        if k not in x:
            raise ValueError(f"dataset {root}: samples lack {k!r} (have {sorted(x)})")
        if tuple(x[k].shape) != shape:
            raise ValueError(f"dataset {root}: sample {k!r} has shape {tuple(x[k].shape)}, the config expects {shape}")
    if not torch.isfinite(x["action"]).all():
        raise ValueError(f"dataset {root}: normalised actions hold NaN/inf (check meta/stats.json q01/q99)")


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of epoch ``epoch``'s global order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def draw_training(seeds: torch.Tensor, repeats: int, horizon: int, action_dim: int, train_steps: int,
                  cond_dropout: float) -> TrainingDraws:  # fmt: skip
    """Per-sample draws (B, R, ...) from per-sample CPU generators (cheap: B * R * H * D numbers)."""
    noise, ts, drops = [], [], []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(int(s))
        ts.append(torch.randint(0, train_steps, (repeats,), generator=g))
        noise.append(torch.randn(repeats, horizon, action_dim, generator=g))
        drops.append(torch.rand(repeats, generator=g) < cond_dropout)
    return TrainingDraws(torch.stack(noise), torch.stack(ts), torch.stack(drops))


class SeededDataset(Dataset):
    """Wraps a dataset so the sampler's ``(index, seed)`` keys come back as the sample plus its seed."""

    def __init__(self, dataset: PolicyDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, seed = key
        # a dataset whose samples depend on the draw (cached augmented views) takes the seed itself
        get_seeded = getattr(self.dataset, "get_seeded", None)
        x = self.dataset[i] if get_seeded is None else get_seeded(i, seed)
        x[SEED_KEY] = torch.tensor(seed, dtype=torch.int64)
        return x


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """DistributedSampler semantics (epoch-seeded global order, rank r takes positions r, r + W, ...),
    plus: the global order is the dataset's episode-block shuffle, epochs are cut to whole global batches
    (so every step sees a full global batch on every rank), and an epoch can start at any position (resume)."""

    def __init__(self, dataset: PolicyDataset, global_batch: int, rank: int, world_size: int, seed: int,
                 block_episodes: int = 8) -> None:  # fmt: skip
        if len(dataset) < global_batch:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one global batch ({global_batch}); "
                "lower --batch-size / --grad-accum"
            )
        self.order_sampler = dataset.make_sampler(shuffle=True, block_episodes=block_episodes, seed=seed)
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world_size, seed
        self.steps_per_epoch = len(dataset) // global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration: epoch ``epoch`` from global position ``start`` (a multiple of the global batch)."""
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return (self.steps_per_epoch * self.global_batch - self.start) // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.order_sampler.set_epoch(self.epoch)
        order = list(self.order_sampler)
        stop = self.steps_per_epoch * self.global_batch
        for p in range(self.start + self.rank, stop, self.world):
            yield order[p], sample_seed(self.seed, self.epoch, p)


def _worker_init(worker_id: int) -> None:
    # Samples carry no randomness of their own (draws come from SEED_KEY); seed numpy anyway so any
    # future augmentation in a worker is reproducible rather than forked from the parent's state.
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32 if info is not None else worker_id)


class StepStream:
    """Micro-batches for this rank, epoch after epoch, starting at (epoch, position)."""

    def __init__(self, dataset: PolicyDataset, batch_size: int, global_batch: int, rank: int, world_size: int,
                 seed: int, num_workers: int, block_episodes: int, pin_memory: bool) -> None:  # fmt: skip
        self.sampler = ResumableDistributedSampler(dataset, global_batch, rank, world_size, seed, block_episodes)
        self.global_batch = global_batch
        g = torch.Generator().manual_seed(seed)  # the workers' base seeds
        self.loader = DataLoader(
            SeededDataset(dataset), batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            drop_last=True, pin_memory=pin_memory, persistent_workers=num_workers > 0,
            worker_init_fn=_worker_init, generator=g, prefetch_factor=4 if num_workers > 0 else None,
        )  # fmt: skip
        self.epoch, self.position = 0, 0  # next global position to be consumed
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position, self._it = epoch, position, None

    def next_step(self, grad_accum: int) -> list[dict[str, Any]]:
        """The ``grad_accum`` micro-batches of the next optimiser step (never split across epochs)."""
        if self.position >= self.steps_per_epoch * self.global_batch:
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self.sampler.set_epoch(self.epoch, self.position)
            self._it = iter(self.loader)
        out = [next(self._it) for _ in range(grad_accum)]
        self.position += self.global_batch
        return out
