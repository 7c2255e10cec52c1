"""Episode videos: frames upscaled, a status bar drawn under them (router weight, head, gripper
command), encoded as H.264 mp4 with PyAV (MPEG-4 Part 2 if the FFmpeg build lacks libx264)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BAR_HEIGHT = 36  # pixels of status bar under the frame (even: yuv420p needs even sizes)


def annotate_frames(
    frames: np.ndarray,
    router_weight: np.ndarray,
    gripper: np.ndarray,
    label: str = "",
    scale: int = 2,
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames -> (T, scale*H + BAR_HEIGHT, scale*W, 3) with, per step t, a bar
    showing ``router_weight[t]`` (filled to w, 0.5 mark; "-" when NaN), the head it selects, and the
    gripper command (green open / red closed). ``label`` (e.g. the task) is written on every frame."""
    from PIL import Image, ImageDraw

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"annotate_frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if len(router_weight) < t or len(gripper) < t:
        raise ValueError(
            f"annotate_frames: {t} frames but {len(router_weight)} weights / {len(gripper)} gripper values"
        )
    big = frames.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest: keeps what the policy saw
    H, W = h * scale, w * scale
    out = np.zeros((t, H + BAR_HEIGHT, W, 3), dtype=np.uint8)
    out[:, :H] = big
    bar_x0, bar_x1 = 4, W - 64
    for i in range(t):
        img = Image.fromarray(out[i])
        d = ImageDraw.Draw(img)
        wt = float(router_weight[i])
        y0 = H + 4
        d.rectangle([bar_x0, y0, bar_x1, y0 + 10], outline=(200, 200, 200))
        if np.isfinite(wt):
            d.rectangle(
                [bar_x0, y0, bar_x0 + int(round(wt * (bar_x1 - bar_x0))), y0 + 10], fill=(70, 130, 230)
            )
            head = "gripper" if wt >= 0.5 else "arm"
            text = f"w={wt:.2f} {head} head"
        else:
            text = "w=-"
        mid = bar_x0 + (bar_x1 - bar_x0) // 2
        d.line([mid, y0 - 2, mid, y0 + 12], fill=(255, 255, 255))
        is_open = float(gripper[i]) > 0.5
        d.rectangle([W - 58, y0, W - 4, y0 + 26], fill=(40, 170, 60) if is_open else (200, 50, 50))
        d.text((W - 54, y0 + 8), "open" if is_open else "closed", fill=(255, 255, 255))
        d.text((bar_x0, y0 + 14), f"{text}  t={i}", fill=(255, 255, 255))
        if label:
            d.text((4, 2), label, fill=(255, 255, 0))
        out[i] = np.asarray(img)
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 30.0) -> Path:
    """Encode (T, H, W, 3) uint8 frames (H, W even) to ``path``."""
    import av

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4: yuv420p needs even sizes, got {h}x{w}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(out), "w") as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "23"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())
    return out
