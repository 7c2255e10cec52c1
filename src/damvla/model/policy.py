"""DAMVLAPolicy: vision + language model + router + DiT action heads, with LeRobot's policy API.

forward(batch) -> (loss, logs)          training (batch keys: docs/CONTRACTS.md)
predict_action_chunk(batch) -> (B, H, D) un-normalised actions (+ router weight with return_info=True)
select_action(batch) -> (B, D)          through an action queue; reset() clears it
save_pretrained(dir) / from_pretrained(dir): config.json + model.safetensors + normalization.json + metadata.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from damvla import __version__, keys
from damvla.config import PolicyConfig
from damvla.diffusion import Diffusion, TrainingDraws
from damvla.keys import ENV_STATE_KEY, STATE_KEY
from damvla.model.action_queue import ActionQueue
from damvla.model.dit import DiTActionHead
from damvla.model.language import LanguageBackbone
from damvla.model.loss import diffusion_losses, dual_scale_weights, router_loss
from damvla.model.router import Router
from damvla.model.tokenizer import ByteTokenizer, HFTokenizer
from damvla.model.vision import (
    DualVisionEncoder,
    PatchQueries,
    VisionFeatures,
    feature_keys,
    grid_position_code,
)
from damvla.model.weights import load_safetensors_into, skip_init, state_fingerprint
from damvla.normalize import ActionNormalizer

CHECKPOINT_FILES = ("config.json", "model.safetensors", "normalization.json", "metadata.json")
ARM, GRIPPER = 0, 1
# metadata.json entry of a checkpoint whose frozen encoder is referenced by path instead of copied.
VISION_REFERENCE = "vision_reference"


class DAMVLAPolicy(nn.Module):
    def __init__(
        self,
        config: PolicyConfig,
        normalizer: ActionNormalizer | None = None,
        metadata: dict[str, Any] | None = None,
        load_pretrained: bool = True,
        load_vision: bool | None = None,
    ) -> None:
        """``load_pretrained``: read ``*.pretrained_path`` weights (False when a checkpoint supplies every
        weight); ``load_vision`` overrides it for the vision tower (a checkpoint that references its frozen
        encoder instead of copying it)."""
        super().__init__()
        self.config = config.validate()
        if normalizer is not None and normalizer.dim != config.action_dim:
            raise ValueError(f"normaliser has {normalizer.dim} action dimensions, config.action_dim={config.action_dim}")
        self.normalizer = normalizer
        self.metadata = dict(metadata or {})
        v, lang, ab = config.vision, config.language, config.ablation
        self.vision = DualVisionEncoder(v, load_pretrained=load_pretrained if load_vision is None else load_vision)
        if v.frozen:
            self.vision.requires_grad_(False)
        self.language = LanguageBackbone(lang, v.patch_dim, load_pretrained=load_pretrained)
        d_cls = v.dinov2.hidden_size
        r = v.num_local_tokens
        # Registers stand-in for an encoder without them (trainable, after any feature cache).
        self.gripper_queries = (
            PatchQueries(v.gripper_queries, d_cls) if v.gripper_queries and ab.vt else None
        )
        arm_queries = v.arm_queries if ab.vt and ab.dam else 0
        self.arm_queries = PatchQueries(arm_queries, d_cls) if arm_queries else None
        if v.patch_position:  # fixed, rebuilt from the config: not saved
            self.register_buffer("patch_position", grid_position_code(v.num_patches, v.patch_dim), persistent=False)
        else:
            self.patch_position = None
        # Several cameras: a learned code per camera added to its patch tokens, so the LLM and the queries can
        # tell two views' tokens of the same grid cell apart (our choice, docs/method.md).
        n_cam = len(v.cameras)
        self.camera_code = nn.Parameter(torch.randn(n_cam, v.patch_dim) * 0.02) if n_cam > 1 else None
        if config.state_dim:
            # Dataset mean / std of observation.state (set by the trainer, saved with the weights).
            self.register_buffer("state_mean", torch.zeros(config.state_dim))
            self.register_buffer("state_std", torch.ones(config.state_dim))
        cond_dim = lang.hidden_size + config.state_dim  # f_cog, then the normalised state
        if config.env_state_dim:
            # Training-only auxiliary regressor f_cog -> normalised environment state, and that state's
            # dataset mean / std (set by the trainer, saved with the weights).
            h = lang.hidden_size
            self.env_state_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, config.env_state_dim))
            self.register_buffer("env_state_mean", torch.zeros(config.env_state_dim))
            self.register_buffer("env_state_std", torch.ones(config.env_state_dim))
        else:
            self.env_state_head = None

        def head(num_visual: int) -> DiTActionHead:
            return DiTActionHead(config.dit, config.action_dim, config.horizon, cond_dim, d_cls, num_visual)

        if ab.dam:
            # Arm head: global class token(s). Gripper head: local register tokens (METHOD.md §1).
            self.heads = nn.ModuleDict({"arm": head(n_cam + arm_queries if ab.vt else 0), "gripper": head(r if ab.vt else 0)})
            self.router = Router(lang.hidden_size, config.router_hidden)
        else:
            # One head (CogACT). With VT on it sees class and register tokens (our choice; paper silent).
            self.heads = nn.ModuleDict({"action": head(n_cam + r if ab.vt else 0)})
            self.router = None
        self.diffusion = Diffusion(config.diffusion)
        self._queue = ActionQueue(config.inference, config.horizon, config.gripper_index)

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def image_keys(self) -> list[str]:
        """The batch keys of every camera the policy reads (``vision.cameras``), in token order."""
        return [keys.image_key(c) for c in self.config.vision.cameras]

    @property
    def image_key(self) -> str:
        """The first camera's batch key."""
        return self.image_keys[0]

    def _images(self, batch: dict[str, Any], key: str) -> torch.Tensor:
        s = self.config.vision.image_size
        if key not in batch:
            have = sorted(k for k in batch if k.startswith(keys.IMAGE_KEY_PREFIX))
            raise ValueError(f"batch lacks {key!r} (vision.cameras={self.config.vision.cameras!r}); image keys present: {have}")
        x = batch[key]
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{key}: expected a torch tensor (B, 3, {s}, {s}), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"{key}: expected shape (B, 3, {s}, {s}) (channel-first RGB at vision.image_size), got {tuple(x.shape)}")
        dev = self._device()
        if x.dtype == torch.uint8:
            return x.to(dev).float() / 255.0
        if not x.is_floating_point():
            raise ValueError(f"{key}: expected uint8 or float in [0, 1], got dtype {x.dtype}")
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"{key}: float images must be in [0, 1], got range [{x.min():.3f}, {x.max():.3f}]")
        return x.to(dev).float()

    def _tasks(self, batch: dict[str, Any], b: int) -> list[str]:
        if "task" not in batch:
            raise ValueError("batch lacks 'task' (the instruction string per sample)")
        t = batch["task"]
        tasks = [t] if isinstance(t, str) else list(t)
        if len(tasks) != b:
            raise ValueError(f"task: {len(tasks)} instructions for a batch of {b} images")
        return tasks

    def _device(self) -> torch.device:
        return self.vision.dino_mean.device

    def set_state_stats(self, mean: Any, std: Any) -> None:
        """Normalisation of ``observation.state`` (dataset mean / std; std floored at 1e-3)."""
        if not self.config.state_dim:
            raise ValueError("set_state_stats: the policy does not read the state (state_dim=0)")
        self._set_stats("state", "state stats", "state_dim", mean, std)

    def set_env_state_stats(self, mean: Any, std: Any) -> None:
        """Normalisation of ``observation.environment_state`` (dataset mean / std; std floored at 1e-3, so a
        dimension that never varies, e.g. Meta-World's padding for an absent second object, is a constant 0)."""
        if not self.config.env_state_dim:
            raise ValueError("set_env_state_stats: the policy has no environment-state target (env_state_dim=0)")
        self._set_stats("env_state", "environment-state stats", "env_state_dim", mean, std)

    def _set_stats(self, prefix: str, what: str, dim_field: str, mean: Any, std: Any) -> None:
        """Copy a dataset mean / std (std floored at 1e-3) into the buffers ``{prefix}_mean`` / ``{prefix}_std``."""
        dim = getattr(self.config, dim_field)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten().clamp_min(1e-3)
        if mean_t.numel() != dim or std_t.numel() != dim:
            raise ValueError(f"{what} have {mean_t.numel()} dims, config {dim_field}={dim}")
        getattr(self, f"{prefix}_mean").copy_(mean_t)
        getattr(self, f"{prefix}_std").copy_(std_t)

    def env_state_loss(self, f_cog: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The auxiliary loss: mean squared error of the regressor's normalised environment state (our choice)."""
        assert self.env_state_head is not None
        n = self.config.env_state_dim
        if ENV_STATE_KEY not in batch:
            raise ValueError(f"batch lacks {ENV_STATE_KEY!r}: this policy trains an environment-state target "
                             f"(env_state_dim={n}); collect the dataset with it or pass env_state_dim=0")  # fmt: skip
        x = torch.as_tensor(batch[ENV_STATE_KEY]).to(f_cog.device).float()
        if x.shape != (f_cog.shape[0], n):
            raise ValueError(f"{ENV_STATE_KEY}: expected shape {(f_cog.shape[0], n)} (B, env_state_dim), got {tuple(x.shape)}")
        target = (x - self.env_state_mean) / self.env_state_std
        return torch.nn.functional.mse_loss(self.env_state_head(f_cog).float(), target)

    def _condition(self, f_cog: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The heads' condition vector: f_cog, plus the normalised state when ``state_dim`` > 0."""
        s = self.config.state_dim
        if not s:
            return f_cog
        if STATE_KEY not in batch:
            raise ValueError(f"batch lacks {STATE_KEY!r}: this policy conditions on the state (state_dim={s})")
        x = torch.as_tensor(batch[STATE_KEY]).to(f_cog.device).float()
        if x.shape != (f_cog.shape[0], s):
            raise ValueError(f"{STATE_KEY}: expected shape {(f_cog.shape[0], s)} (B, state_dim), got {tuple(x.shape)}")
        return torch.cat([f_cog, ((x - self.state_mean) / self.state_std).to(f_cog.dtype)], dim=-1)

    # ---- the VLM -------------------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> list[VisionFeatures]:
        """The frozen-able vision features, one per camera (``image_keys``' order): from the images, or from a
        feature cache's batch keys (``feature_keys(k)``, what ``self.vision`` returns for camera k's images)."""
        out = []
        for k, image_key in enumerate(self.image_keys):
            keys = feature_keys(k)
            if keys["patches"] in batch:
                dev = self._device()
                out.append(VisionFeatures(**{f: batch[key].to(dev).float() for f, key in keys.items()}))
            else:
                out.append(self.vision(self._images(batch, image_key)))
        return out

    def complete_features(self, feats: VisionFeatures | list[VisionFeatures]) -> VisionFeatures:
        """Steps after the (frozen, cacheable) vision tower: the patch grid's position code (and with several
        cameras each camera's code), the cameras' tokens joined in camera order, then learned gripper queries
        in place of the (absent) registers."""
        cams = [feats] if isinstance(feats, VisionFeatures) else list(feats)
        if len(cams) != len(self.config.vision.cameras):
            raise ValueError(f"{len(cams)} cameras' features for a policy that reads {len(self.config.vision.cameras)}")
        grids = []
        for k, f in enumerate(cams):
            patches = f.patches
            if self.patch_position is not None:
                patches = patches + self.patch_position.to(patches.dtype)
            if self.camera_code is not None:
                patches = patches + self.camera_code[k].to(patches.dtype)
            grids.append(patches)
        patches = torch.cat(grids, dim=1)
        cls = torch.cat([f.cls for f in cams], dim=1)
        if self.gripper_queries is None:
            return VisionFeatures(patches, cls, torch.cat([f.registers for f in cams], dim=1))
        dino = patches[..., : self.config.vision.dinov2.hidden_size]
        return VisionFeatures(patches, cls, self.gripper_queries(dino))

    def encode(self, batch: dict[str, Any]) -> tuple[VisionFeatures, torch.Tensor, torch.Tensor]:
        """Images (or cached features) + instructions -> (vision features, f_cog (B, h), f_rea (B, h))."""
        feats = self.complete_features(self.features(batch))
        f_cog, f_rea = self.language(feats.patches, self._tasks(batch, feats.patches.shape[0]))
        return feats, f_cog, f_rea

    def _visual_condition(self, name: str, feats: VisionFeatures) -> torch.Tensor | None:
        if not self.config.ablation.vt:
            return None
        if name == "arm":
            if self.arm_queries is None:
                return feats.cls
            return torch.cat([feats.cls, self.arm_queries(feats.patches[..., : self.config.vision.dinov2.hidden_size])], dim=1)
        if name == "gripper":
            return feats.registers
        return torch.cat([feats.cls, feats.registers], dim=1)

    def _router_logit(self, f_cog: torch.Tensor, f_rea: torch.Tensor) -> torch.Tensor:
        assert self.router is not None
        return self.router(f_rea if self.config.ablation.dl else f_cog)

    # ---- training ------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, Any],
        draws: TrainingDraws | None = None,
        num_valid: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss. ``draws``: pre-drawn noise, timesteps and condition dropout per sample (default:
        drawn from the global torch RNG). ``num_valid``: divisor of the diffusion losses (default: this
        batch's unpadded chunk elements x R; see ``loss.diffusion_losses``)."""
        cfg = self.config
        feats, f_cog, f_rea = self.encode(batch)
        b, dev = f_cog.shape[0], f_cog.device
        if "action" not in batch:
            raise ValueError("batch lacks 'action' (B, H, D) normalised action chunks")
        actions = batch["action"].to(dev).float()
        if actions.shape != (b, cfg.horizon, cfg.action_dim):
            raise ValueError(f"action: expected shape {(b, cfg.horizon, cfg.action_dim)} (B, horizon, action_dim), got {tuple(actions.shape)}")
        is_pad = batch.get("action_is_pad")
        is_pad = torch.zeros(b, cfg.horizon, dtype=torch.bool, device=dev) if is_pad is None else is_pad.to(dev).bool()
        traj = batch.get("trajectory_weight")
        weights = dual_scale_weights(
            None if traj is None else traj.to(dev), is_pad, len(self.heads), cfg.ablation, cfg.weighting
        )

        # Repeated diffusion steps: one VLM forward, R noise/timestep draws per sample.
        r = cfg.diffusion.repeated_steps
        x0 = actions.repeat(r, 1, 1)  # row k * b + i: repeat k of sample i
        if draws is None:
            x_t, eps, t = self.diffusion.add_noise(x0)
            drop = torch.rand(b * r, device=dev) < cfg.diffusion.cond_dropout if self.training else None
        else:
            if draws.noise.shape != (b, r, cfg.horizon, cfg.action_dim) or draws.timesteps.shape != (b, r):
                raise ValueError(
                    f"draws: expected noise {(b, r, cfg.horizon, cfg.action_dim)} and timesteps {(b, r)} "
                    f"(B, diffusion.repeated_steps, ...), got {tuple(draws.noise.shape)} and {tuple(draws.timesteps.shape)}"
                )
            # sample-major (B, R, ...) -> the repeat layout (R * B, ...) of x0
            eps = draws.noise.to(dev, x0.dtype).transpose(0, 1).reshape_as(x0)
            t = draws.timesteps.to(dev).transpose(0, 1).reshape(-1)
            x_t, eps, t = self.diffusion.add_noise(x0, noise=eps, t=t)
            drop = draws.drop_cond.to(dev).transpose(0, 1).reshape(-1) if self.training else None
        cond = self._condition(f_cog, batch).repeat(r, 1)
        preds = []
        for name, head in self.heads.items():
            vis = self._visual_condition(name, feats)
            preds.append(head(x_t, t, cond, None if vis is None else vis.repeat(r, 1, 1), drop))
        losses = diffusion_losses(preds, eps, weights.repeat(r, 1, 1), is_pad.repeat(r, 1), num_valid)
        loss = sum(losses)
        logs: dict[str, float] = {}
        if self.router is not None:
            logs["loss_arm"], logs["loss_gripper"] = float(losses[0].detach()), float(losses[1].detach())
            if "router_label" not in batch:
                raise ValueError("batch lacks 'router_label' (B,), needed to train the router (ablation.dam on)")
            label = batch["router_label"].to(dev).reshape(b)
            logit = self._router_logit(f_cog, f_rea)
            l_router = router_loss(logit, label)
            loss = loss + cfg.weighting.router_loss_weight * l_router
            logs["loss_router"] = float(l_router.detach())
            logs["router_acc"] = float(((logit.detach() >= 0) == (label >= 0.5)).float().mean())
            logs["router_weight_mean"] = float(torch.sigmoid(logit.detach()).mean())
        else:
            logs["loss_action"] = float(losses[0].detach())
        if self.env_state_head is not None:
            l_env = self.env_state_loss(f_cog, batch)
            loss = loss + cfg.env_state_weight * l_env
            logs["loss_env_state"] = float(l_env.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        return_info: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Un-normalised action chunks (B, H, D). ``noise`` (B, H, D) fixes the initial DDIM noise.
        With ``return_info``: also {"router_weight": (B,), "head": (B,) 0 arm / 1 gripper, "normalized": the
        sampled chunks (B, H, D) in model space, before clipping and un-normalising}."""
        cfg = self.config
        if self.normalizer is None:
            raise ValueError(
                "policy has no action normalisation stats: load a checkpoint, or pass normalizer= "
                "(ActionNormalizer.identity(D) to predict in normalised units)"
            )
        feats, f_cog, _ = encoded = self.encode(batch)
        b, dev = f_cog.shape[0], f_cog.device
        condition = self._condition(f_cog, batch)
        shape = (b, cfg.horizon, cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, device=dev, generator=generator)
        elif noise.shape != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        noise = noise.to(dev).float()

        def eps_fn_for(name: str, rows: torch.Tensor) -> Any:
            head = self.heads[name]
            vis = self._visual_condition(name, feats)
            cond = condition[rows]
            vis = None if vis is None else vis[rows]

            def eps_fn(x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
                k = x.shape[0] // cond.shape[0]  # 2 with guidance (cond + uncond halves)
                return head(x, t, cond.repeat(k, 1), None if vis is None else vis.repeat(k, 1, 1), uncond)

            return eps_fn

        if self.router is None:
            w = torch.zeros(b, device=dev)
            chosen = torch.zeros(b, dtype=torch.long, device=dev)
            x0 = self.diffusion.sample(eps_fn_for("action", torch.arange(b, device=dev)), noise)
        else:
            w = torch.sigmoid(self._router_logit(encoded[1], encoded[2]).float())
            chosen = (w >= 0.5).long()
            if cfg.inference.routing == "hard":
                x0 = torch.empty_like(noise)
                for idx, name in ((ARM, "arm"), (GRIPPER, "gripper")):
                    rows = torch.nonzero(chosen == idx).flatten()
                    if rows.numel():  # only the chosen head runs for each sample
                        x0[rows] = self.diffusion.sample(eps_fn_for(name, rows), noise[rows])
            else:
                rows = torch.arange(b, device=dev)
                arm, grip = eps_fn_for("arm", rows), eps_fn_for("gripper", rows)

                def blended(x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
                    ww = w.repeat(x.shape[0] // b)[:, None, None]
                    return (1 - ww) * arm(x, t, uncond) + ww * grip(x, t, uncond)

                x0 = self.diffusion.sample(blended, noise)
        actions = self.to_robot_actions(x0)
        if return_info:
            return actions, {"router_weight": w, "head": chosen, "normalized": x0}
        return actions

    def to_robot_actions(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampled chunks in model space (B, H, D) -> robot actions: clip to [-1, 1], un-normalise,
        gripper >= threshold -> 1 (open) else 0."""
        if self.normalizer is None:
            raise ValueError("policy has no action normalisation stats (normalizer=None)")
        actions = self.normalizer.unnormalize_actions(x0.clamp(-1, 1))
        g = self.config.gripper_index
        if g is not None:
            actions[..., g] = (actions[..., g] >= self.config.gripper_threshold).to(actions.dtype)
        return actions

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any]) -> torch.Tensor:
        """One action per sample (B, D) for the current control step, from the action queue."""
        if self._queue.needs_chunk():
            self._queue.push(self.predict_action_chunk(batch))
        return self._queue.pop()

    def reset(self) -> None:
        self._queue.reset()

    # ---- bookkeeping -------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        parts: dict[str, nn.Module | None] = {
            "vision.dinov2": self.vision.dinov2, "vision.siglip": self.vision.siglip,
            "gripper_queries": self.gripper_queries, "arm_queries": self.arm_queries, "projector": self.language.projector,
            "llm": self.language.llm, "router": self.router, "env_state_head": self.env_state_head,
        }
        for name, head in self.heads.items():
            parts[f"head.{name}"] = head
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # ---- save / load -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the checkpoint folder; the config alone rebuilds the architecture."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.normalizer is None:
            raise ValueError("cannot save a policy without normalisation stats (normalizer=None)")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = dict(self.metadata)
        metadata.pop(VISION_REFERENCE, None)
        if self.vision_is_referenced():
            # A frozen pretrained encoder is referenced (its pretrained_path + a fingerprint), not copied.
            state = {k: v for k, v in state.items() if not k.startswith("vision.")}
            metadata[VISION_REFERENCE] = {"fingerprint": state_fingerprint(self.vision), "note": (
                "vision.* weights are not in model.safetensors: they are read from the config's "
                "vision.*.pretrained_path and must match this fingerprint")}  # fmt: skip
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        write_policy_files(out, self.config, self.normalizer, metadata, self.language._tokenizer)
        return out

    def vision_is_referenced(self) -> bool:
        return vision_referenced(self.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DAMVLAPolicy:
        """Load a checkpoint folder. Also accepts a training run folder or its ``checkpoints/`` folder
        (the checkpoint ``latest`` names) or the ``latest`` pointer file itself."""
        src = resolve_checkpoint(path)
        if not src.is_dir():
            raise FileNotFoundError(f"checkpoint folder {src} does not exist")
        missing = [f for f in CHECKPOINT_FILES if not (src / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {src} lacks {missing} (a damvla checkpoint holds {list(CHECKPOINT_FILES)})")
        try:
            body = json.loads((src / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{src / 'config.json'}: not valid JSON ({e})") from e
        if body.pop("type", None) != "damvla":
            raise ValueError(f"{src / 'config.json'}: not a damvla policy config (missing type='damvla')")
        body.pop("damvla_version", None)
        config = PolicyConfig.from_dict(body)
        normalizer = ActionNormalizer.load(src / "normalization.json")
        metadata = json.loads((src / "metadata.json").read_text())
        ref = metadata.get(VISION_REFERENCE)
        with skip_init():  # every parameter comes from model.safetensors (or the referenced encoder)
            policy = cls(config, normalizer, metadata, load_pretrained=False, load_vision=ref is not None)
        if ref is not None:
            check_vision_reference(policy, ref, f"checkpoint {src}")
        if (src / "tokenizer").is_dir():
            policy.language.set_tokenizer(HFTokenizer(src / "tokenizer"))
        elif config.language.tokenizer == "byte":
            policy.language.set_tokenizer(ByteTokenizer())
        load_safetensors_into(policy, src / "model.safetensors", missing_ok=("vision.",) if ref is not None else ())
        return policy.to(device)


def check_vision_reference(policy: DAMVLAPolicy, ref: dict[str, Any], source: str) -> None:
    """Raise unless ``policy.vision`` holds the frozen encoder a checkpoint references (its fingerprint)."""
    got = state_fingerprint(policy.vision)
    if got != ref["fingerprint"]:
        raise ValueError(
            f"{source} was trained with a frozen encoder of fingerprint {ref['fingerprint'][:16]}..., "
            f"but the weights at vision.dinov2.pretrained_path={policy.config.vision.dinov2.pretrained_path!r} "
            f"have {got[:16]}...: they are different weights"
        )


def write_policy_files(out: Path, config: PolicyConfig, normalizer: ActionNormalizer, metadata: dict[str, Any],
                       tokenizer: object | None = None) -> None:  # fmt: skip
    """Everything of a checkpoint folder but ``model.safetensors``: config.json (the architecture),
    normalization.json, metadata.json and, for a transformers tokenizer, ``tokenizer/``."""
    body = {"type": "damvla", "damvla_version": __version__, **config.to_dict()}
    (out / "config.json").write_text(json.dumps(body, indent=2))
    normalizer.save(out / "normalization.json")
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(out / "tokenizer")


def vision_referenced(config: PolicyConfig) -> bool:
    """True when checkpoints reference the vision tower instead of copying it: it is frozen and every
    encoder comes from a ``pretrained_path`` (metadata.json then holds its fingerprint)."""
    v = config.vision
    encoders = [v.dinov2] + ([v.siglip] if v.siglip is not None else [])
    return v.frozen and all(e.pretrained_path for e in encoders)


def resolve_checkpoint(path: str | Path) -> Path:
    """A policy folder from a policy folder, a run folder, a ``checkpoints/`` folder or a ``latest`` file."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        return p.parent / p.read_text().strip()
    if p.is_dir() and not (p / "config.json").exists():
        for pointer in (p / "latest", p / "checkpoints" / "latest"):
            if pointer.is_file():
                return pointer.parent / pointer.read_text().strip()
    return p
