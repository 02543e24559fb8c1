"""Models: the one decoder, its KV-cache sampler, Hugging Face import/export, LoRA and the losses on logits."""
