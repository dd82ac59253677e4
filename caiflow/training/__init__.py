"""Training steps: supervised fine-tuning (`sft`), the reward model (`reward`) and RL (`rl`).

Each module has one entry function taking its typed config from `caiflow.training.config`;
`common` holds what they share (LoRA, checkpoints, out-of-memory back-off, model cards).
Heavy libraries (torch, transformers, trl, peft) are imported inside functions, so importing
this package stays cheap.
"""
