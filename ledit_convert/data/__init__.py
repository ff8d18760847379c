"""Training data: image folders and Hugging Face datasets with class labels or captions (images.py), the latent
cache with encoded captions (latents.py), and text encoding (text.py)."""
