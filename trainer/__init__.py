"""Shoal trainer: supervised fine-tuning (LoRA or full) of a local HF causal LM.

`trainer.loop.train` is the framework-free training loop; `trainer.ray_worker`
adapts it to Ray Train; `trainer.tiny` builds a tiny offline model for tests.
"""
