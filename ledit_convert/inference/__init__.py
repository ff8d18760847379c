"""Stage 3: sampling at any size, class-conditional (pipeline.py, LEDiTPipeline) and text-to-image through
diffusers' PixArt pipelines (text_pipeline.py), and the `sample` command's driver (sampling.py)."""
