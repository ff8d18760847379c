"""The model families as diffusers models: LEDiT for DiT (dit.py) and for PixArt (pixart.py), each a self-contained
file that surgery copies beside the weights as remote code, and regional torch.compile of their blocks."""
