"""Training: pre-training on packed shards (`pretrain`), fine-tuning (`finetune`: SFT, LoRA/QLoRA, DPO) and
merging adapters (`merge`), a minimal SFT loop (`sft`), and the core they share (`core`)."""
