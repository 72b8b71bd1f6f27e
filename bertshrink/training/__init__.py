"""Training: fine-tuning with transformers' Trainer, distillation and its losses, and training under
fake quantization or Quant-Noise."""
