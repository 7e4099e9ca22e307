"""Fine-tuning on top of a trained or downloaded model: SFT (full or LoRA) on chat records, and distillation of a teacher's reasoning traces into a student."""
