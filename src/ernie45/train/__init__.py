"""Training: pre-training on packed shards (`pretrain`), LR schedules and a minimal SFT step (`sft`)."""
