"""Training-side tools: building a tokenizer (and, later, fine-tuning) for LFM2-style models."""
