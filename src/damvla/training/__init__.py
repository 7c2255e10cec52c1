"""Pieces of ``damvla train`` (the loop itself lives in ``damvla.train``).

config.py        TrainConfig (typed) + RunConfig (policy + training) saved with every checkpoint
distributed.py   torchrun environment, process group, DDP / FSDP2 wrapping, small collectives
data.py          resumable distributed sampler, per-sample training draws, dataset/config checks
model.py         freezing stages, LoRA, parameter reports, export state dict (EMA, LoRA merged, gathered)
optim.py         AdamW groups, warm-up + cosine/constant schedule, EMA
checkpoint.py    atomic checkpoint folders, ``latest`` pointer, keep-last-N, resume lookup
logger.py        TensorBoard / wandb / metrics.jsonl / loss-curve PNG
"""
