"""The model families as diffusers models: LEDiT (and the DiT-RoPE baseline) for DiT (dit.py), for PixArt (pixart.py)
and for SD3 (sd3.py), with the positions and their resolution scalings in positions.py and the causal scans, masks and
attention backends in attention.py; files that need torch and diffusers only, which surgery copies beside the weights
as remote code; and regional torch.compile of their blocks."""
