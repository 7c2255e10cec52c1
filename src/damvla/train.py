"""`damvla train`: train a DAM-VLA policy on a LeRobot v3.0 dataset.

    damvla train --preset tiny --dataset DATA --out runs/tiny --steps 2000
    torchrun --nproc_per_node 8 -m damvla.cli train --preset small ... [--parallel fsdp]
    damvla train --resume runs/tiny --steps 4000        # continue the same run up to 4000 steps in total

A plain loop (nanoGPT style): one optimiser step = ``grad_accum`` micro-batches on every process; the
global batch is per-device batch x processes x accumulation. What makes it exact and split-invariant
(see damvla.training.data): the data order depends only on (seed, epoch); each sample's diffusion noise,
timesteps and condition dropout come from its own seed; the diffusion loss is divided by the global
count of unpadded chunk elements. So 1 process x batch 4 and 2 processes x batch 2 compute the same
update, and a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damvla.config import PolicyConfig, apply_overrides, preset
from damvla.data.dataset import ENV_STATE_KEY, PolicyDataset, dataset_content_fingerprint
from damvla.data.hub import parse_repo_id, resolve_dataset
from damvla.data.lerobot import DatasetError
from damvla.training import checkpoint as ckpt_io
from damvla.training.arguments import FLAGS
from damvla.training.augment import augment_images
from damvla.training.config import RunConfig, TrainConfig
from damvla.training.data import (
    SEED_KEY,
    StepStream,
    build_dataset,
    draw_training,
    sample_seed,
    split_episodes,
    state_stats,
)
from damvla.training.distributed import (
    DistContext,
    grad_sync,
    init_distributed,
    is_fsdp,
    shutdown_distributed,
    unwrap,
    wrap_model,
)
from damvla.training.feature_cache import AugmentedViews, CachedFeatureDataset, FeatureCache
from damvla.training.logger import BAR_KEYS, MetricLogger, Smoother, plot_losses
from damvla.training.model import (
    add_lora,
    apply_freeze,
    export_policy,
    export_state,
    parameter_report,
)
from damvla.training.optim import EMA, make_optimizer, make_scheduler

# What may change when resuming without breaking "the same run" (steps: the schedule's total moves with it;
# batch_size / grad_accum / parallel: another process count, as long as the global batch stays the same).
RESUME_MUTABLE = {"steps", "save_every", "keep_last", "num_workers", "wandb", "log_every", "dataset", "out",
                  "batch_size", "grad_accum", "parallel", "threads", "feature_cache", "val_every"}  # fmt: skip


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stops, no checkpoint is written."""


# ---- run config ---------------------------------------------------------------------------------
def resolve_run_config(args: argparse.Namespace) -> tuple[RunConfig, Path | None]:
    """The run's config from the command line, or from the checkpoint when resuming (then only the
    RESUME_MUTABLE flags may change). Returns (config, checkpoint to resume from or None)."""
    given = {f: getattr(args, a) for a, f in FLAGS.items() if getattr(args, a, None) is not None}
    if args.resume:
        ckpt = ckpt_io.find_checkpoint(args.resume)
        run = RunConfig.load(ckpt / ckpt_io.RUN_CONFIG_FILE)
        if args.overrides:
            raise ValueError(f"--resume: policy overrides {args.overrides} cannot change a run in progress")
        t = run.train.to_dict()
        fixed = {k: v for k, v in given.items() if k not in RESUME_MUTABLE and v != t[k]}
        if fixed:
            raise ValueError(
                f"--resume: {sorted(fixed)} differ from the run being resumed ({ {k: t[k] for k in fixed} }); "
                f"only {sorted(RESUME_MUTABLE)} may change"
            )
        if given.get("steps", t["steps"]) != t["steps"] and t["schedule"] == "cosine":
            print(f"note: --steps {given['steps']} (was {t['steps']}): the cosine schedule is stretched to the new "
                  "total from here on, so the run differs from one started with that total")  # fmt: skip
        t.update(given)
        if "out" not in given:
            t["out"] = str(ckpt.parent.parent)
        return RunConfig(run.policy, TrainConfig.from_dict(t)), ckpt
    if getattr(args, "allow_dataset_change", False):
        raise ValueError("--allow-dataset-change applies to --resume only")
    missing = [f"--{k}" for k in ("dataset", "out") if k not in given]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (or --resume RUN_DIR)")
    train = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig) if f.name in given})
    train.overrides = list(args.overrides)
    train.validate()
    if train.init:
        if "preset" in given or "ablation" in given:
            raise ValueError("--init takes the architecture from the checkpoint: drop --preset / --ablation "
                             "(policy overrides still apply)")  # fmt: skip
        policy = apply_overrides(init_config(train), train.overrides)
    else:
        policy = apply_overrides(preset(train.preset, train.ablation), train.overrides)
    out = Path(train.out)
    if ckpt_io.list_checkpoints(out / "checkpoints"):
        raise ValueError(f"--out {out} already holds checkpoints: continue it with --resume {out}, or pick a new --out")
    return RunConfig(policy, train), None


def init_config(train: TrainConfig) -> PolicyConfig:
    """The architecture of ``--init CHECKPOINT`` (its config.json); its tokenizer folder when it has one."""
    from damvla.model.policy import CHECKPOINT_FILES, resolve_checkpoint

    src = resolve_checkpoint(train.init or "")
    missing = [f for f in CHECKPOINT_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--init {train.init}: {src} is not a damvla checkpoint (lacks {missing})")
    body = json.loads((src / "config.json").read_text())
    body.pop("type", None)
    body.pop("damvla_version", None)
    cfg = PolicyConfig.from_dict(body)
    if (src / "tokenizer").is_dir():
        cfg.language.tokenizer = str((src / "tokenizer").resolve())
    train.init = str(src.resolve())
    return cfg


# ---- RNG state --------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    s: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the trainer --------------------------------------------------------------------------------
class Trainer:
    def __init__(self, run: RunConfig, resume_from: Path | None, ctx: DistContext,
                 allow_dataset_change: bool = False) -> None:  # fmt: skip
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from damvla.model.policy import DAMVLAPolicy, vision_referenced
        from damvla.model.weights import load_into, skip_init

        self.run, self.ctx, self.cfg, self.tc = run, ctx, run.policy, run.train
        tc, cfg = self.tc, self.cfg
        self.out = Path(tc.out)
        self.ckpt_root = self.out / "checkpoints"
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and ctx.device.type == "cuda")
        self.global_batch = tc.batch_size * ctx.world_size * tc.grad_accum

        if tc.val_episodes and tc.parallel == "fsdp" and ctx.distributed:
            raise ValueError("--val-episodes with --parallel fsdp is not supported yet (validation runs unsharded)")
        root = self._dataset_root()
        full = build_dataset(root, cfg)
        train_eps, val_eps = split_episodes(full.episode_indices, tc.val_episodes)
        self.dataset = build_dataset(root, cfg, episodes=train_eps) if val_eps else full
        self.val_dataset = build_dataset(root, cfg, episodes=val_eps) if val_eps else None
        self.dataset_fingerprint = dataset_content_fingerprint(full)
        st: dict[str, Any] = {}
        if resume_from is not None:
            st = ckpt_io.load_state(resume_from)
            self._check_dataset(resume_from, st.get("dataset_fingerprint"), allow_dataset_change)
        if ctx.is_main:
            # A crashed (or disk-full) write leaves its temp folder; it holds space the next save needs.
            for p in ckpt_io.remove_stale_temp(self.ckpt_root):
                print(f"note: removed {p}, left by an interrupted checkpoint write", flush=True)
        seed_everything(tc.seed)  # identical initial weights on every rank (FSDP2 does not broadcast them)
        self.model: torch.nn.Module | None = None
        if resume_from is None and tc.init:
            policy = self._policy_from_init(cfg, ctx, full)
        elif resume_from is None:
            policy = DAMVLAPolicy(cfg, self.dataset.normalizer, self.dataset.metadata)
            set_input_stats(policy, full)
        else:
            with skip_init():  # every weight comes from the checkpoint (a referenced frozen encoder: its files)
                policy = DAMVLAPolicy(cfg, self.dataset.normalizer, self.dataset.metadata, load_pretrained=False,
                                      load_vision=vision_referenced(cfg))  # fmt: skip
        if self.model is None:
            apply_freeze(policy, tc.freeze)
        self.lora_scaling = add_lora(policy, tc.lora, tc.lora_alpha) if tc.lora else None
        if resume_from is not None:
            # Live weights: in training_state when they differ from the exported ones (EMA / LoRA).
            live = st.pop("model", None) or load_file(str(resume_from / "model.safetensors"))
            if vision_referenced(cfg):  # the exported file references the frozen encoder built above
                live = {k: v for k, v in policy.state_dict().items() if k.startswith("vision.")} | live
            load_into(policy, live, f"{resume_from}")
        # After the weights are final: the cache is keyed by the frozen tower's weights.
        self.feature_caches: list[FeatureCache] = []  # one per camera, when training reads cached features
        augmenting = bool(tc.aug_shift or tc.aug_color)
        cached = cfg.vision.frozen and tc.feature_cache != "off"
        if tc.aug_views and not (cached and augmenting):
            raise ValueError(f"--aug-views {tc.aug_views} caches augmented views of a frozen tower's features: it needs "
                             "--aug-shift or --aug-color, vision.frozen and the feature cache on")  # fmt: skip
        if cached:
            if augmenting and not tc.aug_views:
                raise ValueError("image augmentation (--aug-shift/--aug-color) needs images, but the frozen vision "
                                 "tower's features come from the cache: pass --aug-views K to cache K views per "
                                 "frame (the frame and K-1 augmented copies), or --feature-cache off to augment "
                                 "every draw online")  # fmt: skip
            views = AugmentedViews(tc.aug_views, tc.aug_shift, tc.aug_color) if tc.aug_views else None
            caches = FeatureCache.for_cameras(policy, full, None if tc.feature_cache == "auto" else tc.feature_cache,
                                              views)  # fmt: skip
            for key, cache in zip(full.camera_keys, caches):
                if not cache.complete and ctx.is_main:
                    per = "once per frame" if views is None else f"for {views.views} views per frame (the frame and augmented copies)"
                    print(f"computing the frozen encoder's features of {key} {per} into {cache.dir}", flush=True)
                cache.build(policy.vision.to(ctx.device), full, progress=ctx.is_main, camera_key=key)
            self.feature_caches = caches
            self.dataset = CachedFeatureDataset(self.dataset, caches)
            if self.val_dataset is not None:
                self.val_dataset = CachedFeatureDataset(self.val_dataset, caches)
        if tc.block_episodes is None:  # resolved once and saved with the run, so resuming keeps the order
            fits = len(full) * len(cfg.vision.cameras) * 3 * cfg.vision.image_size**2 <= full.cache_bytes
            tc.block_episodes = self.dataset.num_episodes if (self.feature_caches or fits) else 8
        if tc.num_workers is None:
            tc.num_workers = 0 if (self.feature_caches or (os.cpu_count() or 1) <= 4) else 4
        self.policy = policy.to(ctx.device)
        self.report, self.counts = parameter_report(policy)
        if self.model is None:  # (--init with FSDP2 sharded the model while building it)
            self.model = wrap_model(self.policy, ctx, tc.parallel, self.bf16)
        self.opt = make_optimizer(self.model, tc)
        self.sched = make_scheduler(self.opt, tc)
        self.ema = EMA(unwrap(self.model), tc.ema) if tc.ema else None  # names without DDP's "module."
        self.stream = StepStream(
            self.dataset, tc.batch_size, self.global_batch, ctx.rank, ctx.world_size, tc.seed, tc.num_workers,
            tc.block_episodes, pin_memory=ctx.device.type == "cuda",
        )  # fmt: skip
        self.step = 0
        self.wall_time = 0.0  # seconds of training (all sessions of the run), logged and saved
        if resume_from is not None:
            if st["global_batch"] != self.global_batch:
                raise ValueError(
                    f"--resume {resume_from}: global batch {self.global_batch} (per-device x processes x accumulation) "
                    f"differs from the run's {st['global_batch']}; keep per-device x processes x accumulation equal"
                )
            set_optimizer_state_dict(self.model, self.opt, st["optimizer"], options=StateDictOptions(full_state_dict=True))
            self.sched.load_state_dict(st["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(st["ema"])
            self.step = int(st["step"])
            self.wall_time = float(st.get("wall_time_s", 0.0))
            self.stream.seek(int(st["epoch"]), int(st["epoch_position"]))
            rngs = st["rng"]
            if len(rngs) == ctx.world_size:
                set_rng_state(rngs[ctx.rank])
            else:
                self.print(f"note: resuming with {ctx.world_size} processes, the run had {len(rngs)}: RNG states re-seeded "
                           "(training draws are per sample, so the data order and noise stay the same)")  # fmt: skip
                seed_everything(tc.seed + self.step + ctx.rank)
            if self.stream.steps_per_epoch != st["steps_per_epoch"]:
                raise ValueError(f"--resume: the dataset now gives {self.stream.steps_per_epoch} steps per epoch, "
                                 f"the run had {st['steps_per_epoch']} (was --dataset changed?)")  # fmt: skip
        self.last_checkpoint: Path | None = resume_from
        self.logger: MetricLogger | None = None

    def _dataset_root(self) -> str:
        """The folder of ``--dataset``: itself, or a Hub dataset id's snapshot in the Hugging Face cache. Rank 0
        resolves it (downloading when needed); the other ranks then read the same commit, from the same
        cache when they share the machine, else downloading that exact commit."""
        spec, ctx = self.tc.dataset, self.ctx
        if not ctx.distributed:
            return str(resolve_dataset(spec, log=self.print))
        result: tuple[str, str | None] = ("", None)
        if ctx.is_main:
            try:
                result = (str(resolve_dataset(spec, log=self.print)), None)
            except DatasetError as e:
                result = ("", str(e))
        path, error = ctx.broadcast_object(result)
        if error is not None:
            raise DatasetError(error)
        parsed = parse_repo_id(spec)
        if ctx.is_main or Path(path).exists() or parsed is None or Path(path).parent.name != "snapshots":
            return path
        return str(resolve_dataset(f"{parsed[0]}@{Path(path).name}", log=None))  # the commit rank 0 read

    def _policy_from_init(self, cfg: PolicyConfig, ctx: DistContext, full: Any) -> torch.nn.Module:
        """``--init``: the checkpoint's weights, loaded without a full host copy per rank (parameters on
        the meta device, then allocated where they live: sharded under FSDP2, once per process otherwise)."""
        from damvla.training.model import policy_from_checkpoint

        tc = self.tc
        fsdp = tc.parallel == "fsdp" and ctx.distributed
        if fsdp and tc.lora:
            raise ValueError("--init with --parallel fsdp and --lora is not supported yet: use --parallel ddp for LoRA")
        if fsdp and tc.feature_cache != "off" and cfg.vision.frozen:
            raise ValueError("--init with --parallel fsdp and a frozen, cached vision tower is not supported yet: "
                             "pass --feature-cache off")  # fmt: skip

        def shard(policy: torch.nn.Module) -> torch.nn.Module:
            apply_freeze(policy, tc.freeze)  # FSDP2 needs requires_grad settled before sharding
            return wrap_model(policy, ctx, tc.parallel, self.bf16)

        policy, model = policy_from_checkpoint(tc.init or "", cfg, self.dataset.normalizer, self.dataset.metadata,
                                               shard if fsdp else None, ctx.device)  # fmt: skip
        set_input_stats(policy, full)
        policy.metadata["init"] = tc.init
        self.model = model
        return policy

    def _check_dataset(self, resume_from: Path, saved: str | None, allow_change: bool) -> None:
        """Resuming on other data silently makes a different run: refuse unless --allow-dataset-change."""
        if saved == self.dataset_fingerprint:
            return
        was = RunConfig.load(resume_from / ckpt_io.RUN_CONFIG_FILE).train.dataset
        if saved is None:  # runs saved before checkpoints recorded the dataset's fingerprint
            self.print(f"note: {resume_from} records no dataset fingerprint (an older run): cannot check that "
                       f"--dataset {self.tc.dataset} holds the same data as the run's {was}")  # fmt: skip
        elif allow_change:
            self.print(f"note: --allow-dataset-change: the run continues on {self.tc.dataset} "
                       f"(its contents differ from the run's dataset {was})")  # fmt: skip
        else:
            raise ValueError(
                f"--resume {resume_from}: dataset {self.tc.dataset} differs in content from the run's dataset {was} "
                f"(fingerprint {self.dataset_fingerprint[:12]} vs {saved[:12]}); resume with the same data, or pass "
                "--allow-dataset-change to continue the run on the new data"
            )

    def print(self, *a: Any) -> None:
        if self.ctx.is_main:
            print(*a, flush=True)

    # ---- one optimiser step -----------------------------------------------------------------
    def train_step(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        cfg, tc, ctx = self.cfg, self.tc, self.ctx
        r = cfg.diffusion.repeated_steps
        # Divisor of the diffusion loss: the global count of unpadded chunk elements x R, per micro-batch,
        # so averaging micro-batches (accumulation) and ranks (DDP) gives the whole global batch's loss.
        n_local = torch.tensor(float(sum(int((~mb["action_is_pad"]).sum()) for mb in micro)), dtype=torch.float64)
        n_global = float(ctx.all_reduce_sum(n_local)) * r
        num_valid = max(n_global, 1.0) / (ctx.world_size * tc.grad_accum)
        sums: dict[str, float] = {}
        self.model.train()
        for k, mb in enumerate(micro):
            seeds = mb.pop(SEED_KEY)
            if (tc.aug_shift or tc.aug_color) and not self.feature_caches:  # (cached: the sample's view)
                for key in self.policy.image_keys:
                    mb[key] = augment_images(mb[key], seeds, tc.aug_shift, tc.aug_color)
            draws = draw_training(seeds, r, cfg.horizon, cfg.action_dim, cfg.diffusion.train_steps, cfg.diffusion.cond_dropout)
            last = k == len(micro) - 1
            autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with grad_sync(self.model, last), autocast:
                loss, logs = self.model(mb, draws=draws, num_valid=num_valid)
                (loss / tc.grad_accum).backward()
            for key, v in logs.items():
                sums[key] = sums.get(key, 0.0) + v
        keys = sorted(sums)
        local = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        avg = ctx.all_reduce_sum(local) / (ctx.world_size * tc.grad_accum)
        logs = {k: float(v) for k, v in zip(keys, avg)}
        if not math.isfinite(logs["loss"]):
            raise TrainingDiverged(self._diverged_message(f"loss is {logs['loss']}", logs))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tc.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        logs["grad_norm"] = float(gn)
        if not math.isfinite(logs["grad_norm"]):
            raise TrainingDiverged(self._diverged_message(f"gradient norm is {logs['grad_norm']}", logs))
        logs["lr"] = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return logs

    def _diverged_message(self, what: str, logs: dict[str, float]) -> str:
        terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
        good = self.last_checkpoint or "none (no checkpoint was written yet)"
        return (f"step {self.step + 1}: {what} ({terms}). Training stopped; no checkpoint was written with these "
                f"weights. Last good checkpoint: {good}. Try a lower --lr, --grad-clip, or check the data.")  # fmt: skip

    # ---- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_samples: int = 256, batch_size: int = 64) -> dict[str, float]:
        """On held-out episodes, with the EMA weights when EMA is on (what checkpoints export):
        ``val_loss`` (the training loss, fixed draws, no condition dropout; without the auxiliary
        environment-state term, logged apart as ``val_loss_env_state``, so rows with and without it compare),
        and open-loop errors of the
        sampled chunks over the steps a chunk executes (``inference.execute_steps``): ``val_action_mae``
        (mean |error| of the non-gripper dimensions, robot units) and ``val_gripper_error`` (fraction of
        wrong open/closed commands)."""
        from torch.utils.data import default_collate

        assert self.val_dataset is not None
        cfg, tc = self.cfg, self.tc
        policy = unwrap(self.model)
        n = len(self.val_dataset)
        idx = np.linspace(0, n - 1, min(n, max_samples)).round().astype(int).tolist()
        k, g = cfg.inference.execute_steps, cfg.gripper_index
        dims = [d for d in range(cfg.action_dim) if d != g]
        sums = {"val_loss": 0.0, "val_action_mae": 0.0, "val_gripper_error": 0.0, "val_loss_env_state": 0.0}
        counts = {"loss": 0, "act": 0, "grip": 0}
        with (self.ema.applied() if self.ema is not None else contextlib.nullcontext()):
            policy.eval()
            try:
                for start in range(0, len(idx), batch_size):
                    rows = idx[start : start + batch_size]
                    batch = default_collate([self.val_dataset[i] for i in rows])
                    # An epoch number training never reaches: validation draws stay apart from every training draw.
                    seeds = torch.tensor([sample_seed(tc.seed, 2**32 - 1, i) for i in rows], dtype=torch.int64)
                    draws = draw_training(seeds, cfg.diffusion.repeated_steps, cfg.horizon, cfg.action_dim,
                                          cfg.diffusion.train_steps, 0.0)  # fmt: skip
                    loss, logs = policy(batch, draws=draws)
                    aux = logs.get("loss_env_state", 0.0)
                    sums["val_loss"] += (float(loss) - cfg.env_state_weight * aux) * len(rows)
                    sums["val_loss_env_state"] += aux * len(rows)
                    counts["loss"] += len(rows)
                    gen = torch.Generator().manual_seed(tc.seed)
                    noise = torch.randn((len(rows), cfg.horizon, cfg.action_dim), generator=gen)
                    pred = policy.predict_action_chunk(batch, noise=noise.to(self.ctx.device)).float().cpu()[:, :k]
                    truth = torch.as_tensor(policy.normalizer.unnormalize_actions(batch["action"].double().numpy()))
                    truth = truth.float()[:, :k]
                    valid = ~batch["action_is_pad"][:, :k]
                    sums["val_action_mae"] += float((pred[..., dims] - truth[..., dims]).abs().mean(-1)[valid].sum())
                    counts["act"] += int(valid.sum())
                    if g is not None:
                        sums["val_gripper_error"] += float(((pred[..., g] >= 0.5) != (truth[..., g] >= 0.5))[valid].sum())
                        counts["grip"] += int(valid.sum())
            finally:
                policy.train()
        out = {"val_loss": sums["val_loss"] / max(counts["loss"], 1),
               "val_action_mae": sums["val_action_mae"] / max(counts["act"], 1)}  # fmt: skip
        if g is not None:
            out["val_gripper_error"] = sums["val_gripper_error"] / max(counts["grip"], 1)
        if cfg.env_state_dim:
            out["val_loss_env_state"] = sums["val_loss_env_state"] / max(counts["loss"], 1)
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Every rank takes part (gathers); rank 0 writes. Returns the folder on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=opts)
        optim = get_optimizer_state_dict(self.model, self.opt, options=opts)
        ema = None
        if self.ema is not None:
            ema = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for n, v in self.ema.shadow.items()}
        rngs = self.ctx.gather_objects(rng_state())
        path = None
        if self.ctx.is_main:
            exported = export_state(full, ema, self.lora_scaling)
            bad = [k for k, v in exported.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise TrainingDiverged(f"step {self.step}: weights hold NaN/inf ({bad[:3]} ...); checkpoint not written")
            state = {
                "format": 1, "step": self.step, "epoch": self.stream.epoch, "epoch_position": self.stream.position,
                "steps_per_epoch": self.stream.steps_per_epoch, "global_batch": self.global_batch,
                "world_size": self.ctx.world_size, "optimizer": optim, "scheduler": self.sched.state_dict(),
                "rng": rngs, "ema": None if self.ema is None else {**self.ema.state_dict(), "shadow": ema},
                "wall_time_s": self.wall_time, "dataset_fingerprint": self.dataset_fingerprint,
                # the live weights, when the exported ones differ from them
                "model": full if (self.ema is not None or self.lora_scaling is not None) else None,
            }  # fmt: skip

            def write(tmp: Path) -> None:
                # The step travels in metadata.json too: a copied checkpoint folder still says which it is.
                meta = {**self.policy.metadata, "step": self.step}
                export_policy(self.policy, exported, meta).save_pretrained(tmp)
                (tmp / ckpt_io.RUN_CONFIG_FILE).write_text(self.run.to_json())
                ckpt_io.save_state(tmp / ckpt_io.STATE_FILE, state)

            size = ckpt_io.tensor_bytes(exported) + ckpt_io.tensor_bytes(state)  # the estimate without a previous one
            path = ckpt_io.write_checkpoint(self.ckpt_root, self.step, write, self.tc.keep_last, size_hint=size)
            self.last_checkpoint = path
        self.ctx.barrier()
        return path

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        from tqdm import tqdm

        tc, ctx = self.tc, self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.logger = MetricLogger(self.out, self.run.to_dict(), tc.wandb, self.step)
        if self.step >= tc.steps:
            self.print(f"nothing to do: the run is at step {self.step} and --steps is {tc.steps}")
            return 0
        bar = tqdm(total=tc.steps, initial=self.step, disable=not ctx.is_main, unit="step", dynamic_ncols=True,
                   desc="train", file=sys.stdout)  # fmt: skip
        smooth = Smoother()
        wait_t = comp_t = 0.0
        rate: float | None = None
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                micro = self.stream.next_step(tc.grad_accum)
                t1 = time.perf_counter()
                logs = self.train_step(micro)
                t2 = time.perf_counter()
                self.step += 1
                self.wall_time += t2 - t0
                wait_t, comp_t = wait_t + (t1 - t0), comp_t + (t2 - t1)
                inst = self.global_batch / max(t2 - t0, 1e-9)
                rate = inst if rate is None else 0.9 * rate + 0.1 * inst
                sm = smooth.update(logs)
                if ctx.is_main:
                    bar.set_postfix({k: f"{sm[k]:.4f}" for k in BAR_KEYS if k in sm} | {"samples/s": f"{rate:.1f}"}, refresh=False)
                    bar.update(1)
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        extra = {"samples_per_s": rate, "data_wait_frac": wait_t / max(wait_t + comp_t, 1e-9),
                                 "epoch": float(self.stream.epoch), "wall_time_s": self.wall_time,
                                 "threads": float(torch.get_num_threads())}  # fmt: skip
                        assert self.logger is not None
                        self.logger.log(self.step, logs | extra)
                        wait_t = comp_t = 0.0
                if self.val_dataset is not None and (self.step % tc.val_every == 0 or self.step == tc.steps):
                    t_val = time.perf_counter()
                    val = self.validate()
                    if ctx.is_main:
                        assert self.logger is not None
                        self.logger.log(self.step, val)
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                                  + f" ({time.perf_counter() - t_val:.1f} s)")  # fmt: skip
                if self.step % tc.save_every == 0 or self.step == tc.steps:
                    path = self.save()
                    if path is not None:
                        bar.write(f"step {self.step}: checkpoint {path}")
        except (TrainingDiverged, ckpt_io.NoSpaceLeft) as e:
            bar.close()
            self._finish()
            print(f"damvla train: error: {e}", file=sys.stderr, flush=True)
            return 1
        bar.close()
        self._finish()
        self.print(f"done: {self.step} steps; final checkpoint {self.last_checkpoint}"
                   + (" (EMA weights)" if self.ema is not None else ""))  # fmt: skip
        return 0

    def _finish(self) -> None:
        if self.logger is not None:
            self.logger.close()
            png = plot_losses(self.out / "metrics.jsonl", self.out / "loss_curves.png")
            if png is not None:
                print(f"loss curves: {png}; TensorBoard: tensorboard --logdir {self.out / 'tb'}", flush=True)

    def describe(self) -> None:
        tc, ctx = self.tc, self.ctx
        ov = " ".join(tc.overrides) or "none"
        # --init takes the architecture from the checkpoint: the preset and ablation names (left at their defaults)
        # say nothing there, the checkpoint's switches do
        if tc.init:
            switches = " ".join(f"{k}={'on' if v else 'off'}" for k, v in vars(self.cfg.ablation).items())
            source = f"weights and architecture from {tc.init} (switches {switches})"
        else:
            source = f"preset {tc.preset}, ablation {tc.ablation or 'damvla'}"
        self.print(f"run: {source}, overrides {ov}; {tc.steps} steps, "
                   f"batch {tc.batch_size}, lr {tc.lr:g} ({tc.schedule}, warm-up {tc.warmup}), EMA {tc.ema or 'off'}, "
                   f"seed {tc.seed}. The whole resolved config is saved as train_config.json in every checkpoint.")  # fmt: skip
        if tc.warmup >= tc.steps:
            self.print(f"warning: the run ends inside the learning-rate warm-up ({tc.steps} steps <= --warmup "
                       f"{tc.warmup}), so the rate never reaches --lr {tc.lr:g} and the loss may look flat; "
                       "lower --warmup for short runs")  # fmt: skip
        self.print(f"dataset {tc.dataset}: {len(self.dataset)} samples in {self.dataset.num_episodes} episodes, "
                   f"{self.stream.steps_per_epoch} steps per epoch")  # fmt: skip
        if self.val_dataset is not None:
            self.print(f"validation: {self.val_dataset.num_episodes} held-out episodes "
                       f"({len(self.val_dataset)} samples), every {tc.val_every} steps")  # fmt: skip
        if self.feature_caches:
            self.print(f"frozen vision features: cache {', '.join(str(c.dir) for c in self.feature_caches)}")
        self.print(f"threads {torch.get_num_threads()}, data workers {tc.num_workers}, "
                   f"shuffle blocks of {tc.block_episodes} episodes")  # fmt: skip
        mode = ("FSDP2" if is_fsdp(self.model) else "DDP") if ctx.distributed else "single process"
        self.print(f"devices: {ctx.world_size} x {ctx.device.type} ({mode}); precision: "
                   f"{'bf16 autocast' if self.bf16 else 'fp32'}")  # fmt: skip
        self.print(f"effective global batch: {self.global_batch} = {tc.batch_size} per device x {ctx.world_size} "
                   f"device(s) x {tc.grad_accum} accumulation step(s)")  # fmt: skip
        self.print(f"trainable parameters (freeze={tc.freeze}, lora={tc.lora or 'off'}):\n{self.report}")
        if self.ema is not None:
            self.print(f"EMA on (decay {tc.ema}): checkpoints export the EMA weights; the live weights are kept "
                       "in training_state.pt for resuming")  # fmt: skip
        if self.lora_scaling is not None:
            self.print("LoRA on: checkpoints export the LLM with the adapters merged into its weights")
        if self.step:
            self.print(f"resuming at step {self.step} (epoch {self.stream.epoch}, position {self.stream.position})")


def set_input_stats(policy: Any, dataset: PolicyDataset) -> None:
    """Dataset mean / std of the state the heads read and of the auxiliary environment-state target."""
    if policy.config.state_dim:
        policy.set_state_stats(*state_stats(dataset))
    if policy.config.env_state_dim:
        policy.set_env_state_stats(*state_stats(dataset, ENV_STATE_KEY))


def set_threads(threads: int | None) -> int:
    """Torch compute threads for this process: ``threads``, else the cores divided by the local processes
    (so several processes on one machine never oversubscribe it)."""
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(threads)
    return threads


def run(args: argparse.Namespace) -> int:
    ctx = init_distributed()
    try:
        run_cfg, resume_from = resolve_run_config(args)
        set_threads(run_cfg.train.threads)
        trainer = Trainer(run_cfg, resume_from, ctx, allow_dataset_change=bool(getattr(args, "allow_dataset_change", False)))
        trainer.describe()
        return trainer.fit()
    finally:
        shutdown_distributed()


