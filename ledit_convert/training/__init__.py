"""Stage 2: fine-tuning with DiT's objective (diffusion.py, trainstep.py) on accelerate (finetune.py) or on
device-resident data (fastloop.py), recipes, resumable state and evaluation during training."""
