"""Fast inference for a trained ``DAMVLAPolicy``: the same action chunks, fewer milliseconds.

``FastPolicy(policy)`` splits ``predict_action_chunk`` into three stages that can be timed apart
(``vision`` -> ``language`` -> ``act``) and removes what makes the reference path slow on a GPU:

- **bf16** weights (``dtype=torch.bfloat16``); the DDIM state itself stays fp32.
- **static prompt shapes**: every prompt is right-padded to ``language.max_prompt_tokens``, so the LLM
  always sees ``1 + N + max_prompt_tokens + 1`` tokens and ``torch.compile`` never re-specialises.
  Right padding needs no attention mask: attention is causal and we only read the cognition position,
  which comes before every pad token, so dropping the mask changes nothing but lets SDPA use its
  causal fast path.
- **torch.compile** of the vision tower and the LLM call (``compile=True``).
- **one CUDA graph per action head** for the whole denoising loop (``cuda_graph=True``): 10 DDIM steps
  with classifier-free guidance. diffusers' ``scheduler.step`` does Python-side table look-ups each
  step, so :class:`DDIMTables` precomputes its coefficients as tensors from the same diffusers scheduler
  and :func:`ddim_sample` applies the identical update with tensor ops only (capturable).

With fp32, no compile and no graphs, ``FastPolicy(p).predict_action_chunk(batch, noise)`` equals
``p.predict_action_chunk(batch, noise)`` to float tolerance (tests/test_fast.py), for hard and soft
routing and for the single-head (CogACT) ablation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from damvla.diffusion import Diffusion, EpsFn
from damvla.model.policy import ARM, GRIPPER, DAMVLAPolicy
from damvla.model.vision import VisionFeatures


# ---- DDIM as tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DDIMTables:
    """Per-step DDIM (eta 0) coefficients, one entry per inference step, in sampling order.

    ``x0 = (x - sqrt_beta[i] * eps) / sqrt_alpha[i]``, clipped to ``[-clip, clip]``;
    ``x <- sqrt_alpha_prev[i] * x0 + sqrt_beta_prev[i] * eps``.
    """

    timesteps: torch.Tensor  # (S,) long
    sqrt_alpha: torch.Tensor  # (S,) float32
    sqrt_beta: torch.Tensor  # (S,)
    sqrt_alpha_prev: torch.Tensor  # (S,)
    sqrt_beta_prev: torch.Tensor  # (S,)
    clip: float | None

    @classmethod
    def from_diffusion(
        cls, diffusion: Diffusion, steps: int | None = None, device: torch.device | str = "cpu"
    ) -> DDIMTables:
        """Read the tables from the very scheduler ``Diffusion.sample`` builds, so they cannot drift."""
        sched = diffusion.ddim_scheduler()
        n = steps or diffusion.cfg.inference_steps
        sched.set_timesteps(n)
        ts = sched.timesteps.long()
        a = sched.alphas_cumprod  # float64 (Diffusion.ddim_scheduler), indexed as DDIMScheduler.step does
        prev = ts - sched.config.num_train_timesteps // n
        a_t = a[ts]
        a_prev = torch.where(prev >= 0, a[prev.clamp(min=0)], sched.final_alpha_cumprod.to(a.dtype))
        # Same ops as DDIMScheduler.step (x ** 0.5, 1 - a), so the tables match it bit for bit.
        clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
        if sched.config.thresholding:
            raise ValueError("DDIMTables: dynamic thresholding is not supported (diffusion uses clip_sample)")
        return cls(
            timesteps=ts.to(device),
            sqrt_alpha=(a_t**0.5).to(device),
            sqrt_beta=((1 - a_t) ** 0.5).to(device),
            sqrt_alpha_prev=(a_prev**0.5).to(device),
            sqrt_beta_prev=((1 - a_prev) ** 0.5).to(device),
            clip=clip,
        )

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, tables: DDIMTables, cfg_scale: float) -> torch.Tensor:
    """DDIM from ``noise`` (B, H, D) to x0 with classifier-free guidance, like ``Diffusion.sample``
    but with tensor ops only: no host syncs, no Python branching on values, so it is CUDA-graph capturable.
    The conditional and unconditional halves go through ``eps_fn`` as one batch of 2B."""
    b = noise.shape[0]
    guided = cfg_scale != 1.0
    uncond = torch.zeros(2 * b if guided else b, dtype=torch.bool, device=noise.device)
    if guided:
        uncond[b:] = True
    x = noise
    for i in range(len(tables)):  # unrolled: indices are Python ints, the values stay on the device
        xin = torch.cat([x, x]) if guided else x
        t = tables.timesteps[i].expand(xin.shape[0])
        eps = eps_fn(xin, t, uncond).to(x.dtype)
        if guided:
            e_c, e_u = eps.chunk(2)
            eps = e_u + cfg_scale * (e_c - e_u)
        x0 = (x - tables.sqrt_beta[i] * eps) / tables.sqrt_alpha[i]
        if tables.clip is not None:
            x0 = x0.clamp(-tables.clip, tables.clip)
        x = tables.sqrt_alpha_prev[i] * x0 + tables.sqrt_beta_prev[i] * eps
    return x


# ---- CUDA graph of a whole denoising loop -------------------------------------------------------
class GraphedLoop:
    """``fn(**inputs) -> tensor`` captured once as a CUDA graph with static input/output buffers.

    Every call copies the inputs into the static buffers, replays the graph and returns a copy of the
    static output (the next replay overwrites it). Shapes and dtypes must equal the capture's."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], warmup: int = 2) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; torch.cuda.is_available() is False")
        self.static_in = {k: v.detach().clone() for k, v in inputs.items()}
        # Warm up on a side stream first: lazy initialisation (cuBLAS workspaces, autotuning) must not
        # happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(**self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(**self.static_in)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for k, v in inputs.items():
            buf = self.static_in[k]
            if v.shape != buf.shape:
                raise ValueError(f"GraphedLoop input {k!r}: captured with shape {tuple(buf.shape)}, got {tuple(v.shape)}")
            buf.copy_(v)
        self.graph.replay()
        return self.static_out.clone()


# ---- the fast policy ----------------------------------------------------------------------------
class FastPolicy:
    """Inference-only wrapper around a ``DAMVLAPolicy`` (shares its weights; puts it in eval mode).

    Args:
        policy: a built or loaded policy, already on its device.
        dtype: cast the policy's weights to this dtype **in place** (e.g. ``torch.bfloat16``); None keeps them.
        compile: ``torch.compile`` the vision tower and the LLM call (first calls are slow: compilation).
        compile_mode: passed to ``torch.compile`` (None = its default).
        cuda_graph: capture each head's whole DDIM loop as a CUDA graph (CUDA only; one capture per
            head and batch size, on first use).
        static_prompt: pad prompts to ``language.max_prompt_tokens`` (fixed LLM shapes). False pads to the
            longest prompt in the batch, as the reference path does.
    """

    def __init__(
        self,
        policy: DAMVLAPolicy,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graph: bool = False,
        static_prompt: bool = True,
    ) -> None:
        dev = policy._device()
        if cuda_graph and dev.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs the policy on a CUDA device (it is on {dev}; "
                f"torch.cuda.is_available()={torch.cuda.is_available()})"
            )
        if policy.normalizer is None:
            raise ValueError("policy has no action normalisation stats: pass normalizer= when building it")
        if policy.config.state_dim:
            raise NotImplementedError(
                "FastPolicy does not pass observation.state to the action heads (state_dim > 0); "
                "use DAMVLAPolicy.predict_action_chunk for state-conditioned policies"
            )
        self.policy = policy.eval()
        if dtype is not None:
            policy.to(dtype)
        self.cfg = policy.config
        self.static_prompt = static_prompt
        self.cuda_graph = cuda_graph
        self.tables = DDIMTables.from_diffusion(policy.diffusion, device=dev)
        self._prompt_cache: dict[str, list[int]] = {}
        self._graphs: dict[tuple[str, int], GraphedLoop] = {}
        self._loops: dict[str, Callable[..., torch.Tensor]] = {}
        # Without CUDA graphs, compile also fuses the denoising loop (10 steps x 2 blocks of small ops,
        # where eager time is mostly per-op dispatch). With graphs, replay already removes that cost.
        self._compile_loops = compile and not cuda_graph
        self._compile_kw: dict[str, Any] = {"dynamic": False, **({"mode": compile_mode} if compile_mode else {})}
        self._vision: Callable[[torch.Tensor], VisionFeatures] = policy.vision
        self._lm: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self._lm_forward
        if compile:
            # dynamic=False: with static prompts the shapes never change, so specialise fully.
            self._vision = torch.compile(policy.vision, **self._compile_kw)
            self._lm = torch.compile(self._lm_forward, **self._compile_kw)

    @property
    def device(self) -> torch.device:
        return self.policy._device()

    # ---- stage 1: vision ------------------------------------------------------------------------
    @torch.no_grad()
    def vision(self, batch: dict[str, Any]) -> VisionFeatures:
        """Images of ``batch`` -> DINOv2/SigLIP features (validated as the policy does)."""
        p = self.policy
        return p.complete_features([self._vision(p._images(batch, key)) for key in p.image_keys])

    # ---- stage 2: language model ----------------------------------------------------------------
    def _prompt_ids(self, instruction: str) -> list[int]:
        # Closed-loop control repeats one instruction for hundreds of steps: tokenise it once.
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            if len(self._prompt_cache) > 4096:  # bounded: a server sees arbitrary strings
                self._prompt_cache.clear()
            ids = self._prompt_cache[instruction] = self.policy.language.prompt_ids(instruction)
        return ids

    def _lm_forward(self, text: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T) ids after the visual tokens, patches (B, N, C) -> (last layer (B, L, h), layer k (B, L, h))."""
        lang = self.policy.language
        llm, k = lang.llm, lang.cfg.reasoning_layer
        emb = llm.embed_tokens
        bos = emb(torch.full((text.shape[0], 1), lang.tokenizer.bos_token_id, dtype=torch.long, device=text.device))
        inputs = torch.cat([bos, lang.projector(patches.to(bos.dtype)), emb(text)], dim=1)
        if k < lang.cfg.num_layers:
            # hidden_states[k] is decoder layer k's output for k < num_layers (transformers applies the
            # final norm to the last entry, hence the hook below for k == num_layers).
            out = llm(inputs_embeds=inputs, use_cache=False, output_hidden_states=True)
            return out.last_hidden_state, out.hidden_states[k]
        captured: dict[str, torch.Tensor] = {}

        def grab(_m: torch.nn.Module, _i: object, o: object) -> None:
            captured["h"] = o[0] if isinstance(o, tuple) else o  # type: ignore[index]

        handle = llm.layers[k - 1].register_forward_hook(grab)
        try:
            last = llm(inputs_embeds=inputs, use_cache=False).last_hidden_state
        finally:
            handle.remove()
        return last, captured["h"]

    @torch.no_grad()
    def language(self, patches: torch.Tensor, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (B, N, C), B instructions -> (f_cog (B, h), f_rea (B, h))."""
        tok = self.policy.language.tokenizer
        b, n, _ = patches.shape
        prompts = [self._prompt_ids(s) for s in tasks]
        width = self.cfg.language.max_prompt_tokens if self.static_prompt else max(len(p) for p in prompts)
        # Built on the host, then one copy: per-sample device writes would be one H2D copy each.
        text = torch.full((b, width + 1), tok.pad_token_id, dtype=torch.long)
        cog_pos = torch.empty(b, dtype=torch.long)
        for i, p in enumerate(prompts):
            text[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            text[i, len(p)] = tok.eos_token_id  # the cognition token
            cog_pos[i] = 1 + n + len(p)
        dev = patches.device
        last, hidden_k = self._lm(text.to(dev, non_blocking=True), patches)
        rows, cog_pos = torch.arange(b, device=dev), cog_pos.to(dev, non_blocking=True)
        return last[rows, cog_pos], hidden_k[rows, cog_pos]

    # ---- stage 3: router + action head ----------------------------------------------------------
    def _visual(self, name: str, feats: VisionFeatures) -> torch.Tensor | None:
        return self.policy._visual_condition(name, feats)

    def _head_loop(self, name: str) -> Callable[..., torch.Tensor]:
        """The whole DDIM loop of one head as ``fn(noise, cond[, visual]) -> x0`` (capturable)."""
        head, scale = self.policy.heads[name], self.cfg.diffusion.cfg_scale

        def loop(noise: torch.Tensor, cond: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
            def eps_fn(x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
                k = x.shape[0] // cond.shape[0]  # 2 with guidance (cond + uncond halves)
                return head(x, t, cond.repeat(k, 1), None if visual is None else visual.repeat(k, 1, 1), uncond)

            return ddim_sample(eps_fn, noise, self.tables, scale)

        return loop

    def _soft_loop(self) -> Callable[..., torch.Tensor]:
        """Soft routing: both heads every step, eps blended by the router weight w (B,)."""
        arm, grip, scale = self.policy.heads["arm"], self.policy.heads["gripper"], self.cfg.diffusion.cfg_scale

        def loop(
            noise: torch.Tensor, cond: torch.Tensor, w: torch.Tensor,
            vis_arm: torch.Tensor | None = None, vis_gripper: torch.Tensor | None = None,
        ) -> torch.Tensor:
            def eps_fn(x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
                k = x.shape[0] // cond.shape[0]
                c = cond.repeat(k, 1)
                e_a = arm(x, t, c, None if vis_arm is None else vis_arm.repeat(k, 1, 1), uncond)
                e_g = grip(x, t, c, None if vis_gripper is None else vis_gripper.repeat(k, 1, 1), uncond)
                ww = w.repeat(k)[:, None, None]
                return (1 - ww) * e_a + ww * e_g

            return ddim_sample(eps_fn, noise, self.tables, scale)

        return loop

    def _loop(self, key: str) -> Callable[..., torch.Tensor]:
        """The loop function for a head name or "soft", built (and compiled) once: a fresh closure per
        call would make torch.compile recompile every time."""
        if key not in self._loops:
            fn = self._soft_loop() if key == "soft" else self._head_loop(key)
            self._loops[key] = torch.compile(fn, **self._compile_kw) if self._compile_loops else fn
        return self._loops[key]

    def _run(self, key: str, **inputs: torch.Tensor | None) -> torch.Tensor:
        """Run loop ``key`` eagerly, or through its CUDA graph (captured on first use per key and batch size)."""
        args = {k: v for k, v in inputs.items() if v is not None}
        fn = self._loop(key)
        if not self.cuda_graph:
            return fn(**args)
        gkey = (key, int(args["noise"].shape[0]))
        if gkey not in self._graphs:
            self._graphs[gkey] = GraphedLoop(fn, args)
        return self._graphs[gkey](**args)

    @torch.no_grad()
    def act(
        self, feats: VisionFeatures, f_cog: torch.Tensor, f_rea: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Router + chosen head's denoising loop + un-normalisation -> (actions (B, H, D), info)."""
        p, cfg = self.policy, self.cfg
        b, dev = f_cog.shape[0], f_cog.device
        noise = noise.to(dev).float()
        if p.router is None:
            w = torch.zeros(b, device=dev)
            chosen = torch.zeros(b, dtype=torch.long, device=dev)
            x0 = self._run("action", noise=noise, cond=f_cog, visual=self._visual("action", feats))
        else:
            w = torch.sigmoid(p._router_logit(f_cog, f_rea).float())
            chosen = (w >= 0.5).long()
            if cfg.inference.routing == "soft":
                x0 = self._run(
                    "soft", noise=noise, cond=f_cog, w=w,
                    vis_arm=self._visual("arm", feats), vis_gripper=self._visual("gripper", feats),
                )
            else:
                x0 = self._hard(feats, f_cog, noise, chosen)
        return p.to_robot_actions(x0), {"router_weight": w, "head": chosen}

    def _hard(self, feats: VisionFeatures, f_cog: torch.Tensor, noise: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Hard routing: each sample through its chosen head only. Choosing is a host decision (one
        small sync), as in the reference path."""
        picks = chosen.tolist()
        x0 = torch.empty_like(noise)
        for idx, name in ((ARM, "arm"), (GRIPPER, "gripper")):
            rows = [i for i, c in enumerate(picks) if c == idx]
            if not rows:
                continue
            vis = self._visual(name, feats)
            if len(rows) == len(picks):  # the common case (always at batch 1): no gather/scatter
                return self._run(name, noise=noise, cond=f_cog, visual=vis)
            if self.cuda_graph:
                # A graph has fixed shapes: run the head on the whole batch and keep its rows (rows are
                # independent in the head), instead of capturing one graph per subset size.
                full = self._run(name, noise=noise, cond=f_cog, visual=vis)
                x0[rows] = full[rows]
            else:
                r = torch.tensor(rows, device=noise.device)
                x0[r] = self._run(name, noise=noise[r], cond=f_cog[r], visual=None if vis is None else vis[r])
        return x0

    # ---- the policy API ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        return_info: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As ``DAMVLAPolicy.predict_action_chunk``: un-normalised action chunks (B, H, D)."""
        feats = self.vision(batch)
        b = feats.patches.shape[0]
        f_cog, f_rea = self.language(feats.patches, self.policy._tasks(batch, b))
        shape = (b, self.cfg.horizon, self.cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, device=f_cog.device, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        actions, info = self.act(feats, f_cog, f_rea, noise)
        return (actions, info) if return_info else actions
