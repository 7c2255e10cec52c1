"""Time and peak memory of loading a policy: a damvla checkpoint (``DAMVLAPolicy.from_pretrained``) and a
policy built on a transformers LLaMA folder (``language.pretrained_path``, the start of a fine-tuning run).

Each load runs in a fresh process, which samples its own anonymous memory (the cost of a load) and reports
its peak RSS (which also counts pages of a memory-mapped weights file). The model is the
``small`` preset with a LLaMA of ``--hidden``/``--layers`` (default about 0.9B parameters, 3.4 GB in float32);
the paper preset needs 30 GB per copy, more than this benchmark's machine has. The ratio of peak memory to
the weights' size is what carries over to the paper scale.

    python benchmarks/bench_load.py [--hidden 2048] [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(2)
from damvla.config import PolicyConfig
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB

# Anonymous memory is what a load costs (file-backed pages of a memory-mapped safetensors file count in RSS
# but are page cache the kernel can drop); Linux keeps no high-water mark for it, so sample it.
peak, done = [status("RssAnon")], threading.Event()
def sample():
    while not done.wait(0.005):
        peak.append(status("RssAnon"))
threading.Thread(target=sample, daemon=True).start()
mode, arg = sys.argv[1], sys.argv[2]
base = status("RssAnon")
t0 = time.perf_counter()
if mode == "checkpoint":
    p = DAMVLAPolicy.from_pretrained(arg)
else:
    cfg = PolicyConfig.from_dict(json.loads(open(arg).read()))
    p = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))
dt = time.perf_counter() - t0
done.set()
peak.append(status("RssAnon"))
n = sum(t.numel() for t in p.state_dict().values())
print(json.dumps({"seconds": dt, "peak_anon_gib": max(peak), "base_anon_gib": base, "peak_rss_gib": status("VmHWM"),
                  "tensors_gib": 4 * n / 2**30}))
"""


def llm_config(hidden: int, layers: int):  # -> PolicyConfig
    from damvla.config import preset

    cfg = preset("small")
    lang = cfg.language
    lang.hidden_size, lang.num_layers = hidden, layers
    lang.num_heads = lang.num_kv_heads = hidden // 128
    lang.intermediate_size = int(hidden * 8 / 3 + 255) // 256 * 256
    lang.reasoning_layer = min(lang.reasoning_layer, layers - 1)
    return cfg.validate()


def measure(mode: str, arg: str, pythonpath: str | None) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    out = subprocess.run([sys.executable, "-c", CHILD, mode, arg], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", default=None, help="write the test weights here (default: a temporary folder)")
    ap.add_argument("--child-pythonpath", default=None,
                    help="PYTHONPATH of the measured loads, e.g. another damvla checkout's src/ (to compare)")
    args = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from damvla.model.language import llama_config
    from damvla.model.policy import DAMVLAPolicy
    from damvla.model.weights import skip_init
    from damvla.normalize import ActionNormalizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = llm_config(args.hidden, args.layers)
        t0 = time.perf_counter()
        with skip_init():  # the values do not matter, only the sizes
            llm = LlamaForCausalLM(llama_config(cfg.language))
        for p in llm.parameters():
            p.data.normal_(0, 0.02)
        llm.save_pretrained(root / "llama")
        del llm
        with skip_init():
            policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))
        for t in policy.state_dict().values():
            if t.is_floating_point():
                t.normal_(0, 0.02)
        policy.save_pretrained(root / "ckpt")
        del policy
        cfg.language.pretrained_path = str(root / "llama")
        (root / "pretrained_config.json").write_text(json.dumps(cfg.to_dict()))
        print(f"wrote test weights in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = {
            "damvla checkpoint (from_pretrained)": measure("checkpoint", str(root / "ckpt"), args.child_pythonpath),
            "transformers LLaMA folder (language.pretrained_path)": measure(
                "pretrained", str(root / "pretrained_config.json"), args.child_pythonpath),
        }  # fmt: skip
    print(f"small preset with a {args.layers}-layer, {args.hidden}-wide LLaMA; torch {torch.__version__}")
    print(f"measured code: {args.child_pythonpath or 'this checkout'}")
    print("| load | seconds | weights (GiB, fp32) | peak anonymous memory added (GiB) | / weights | peak RSS incl. mapped file (GiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        added = r["peak_anon_gib"] - r["base_anon_gib"]
        print(f"| {name} | {r['seconds']:.1f} | {r['tensors_gib']:.2f} | {added:.2f} | {added / r['tensors_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
