"""Stage 1: read a DiT or PixArt checkpoint (checkpoints.py), apply LEDiT's surgery (surgery.py), write a
reloadable model folder (export.py)."""
