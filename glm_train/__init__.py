"""The training program behind the root train.py, one module per job (docs/architecture.md draws the map):

- flags: the flag table and the recipes that fill what flags leave open
- engine: accelerate with DDP, FSDP2 or DeepSpeed ZeRO as `accelerate launch` asked, or a refusal
- data: from a file on disk to micro-batches (sources, preprocess, batches; the built-in generated data)
- model: config, tokenizer and model (LoRA, P-tuning), the optimizer
- checkpoint: the output folder's policy, atomic checkpoints, resume (`load()`, `save(step)`)
- loop: the optimizer step, evaluation; metrics: metrics.jsonl, tokens/s and MFU
- publish: the finished folder as a Hub repository (weights, config, tokenizer, card) and the upload
- skills: the built-in run's held-out score and demo chat
"""
