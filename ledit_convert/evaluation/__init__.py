"""Stage 4: FID (+ precision/recall) per resolution with the offline Inception network (fid.py, evaluate.py)."""
