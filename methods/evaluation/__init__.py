"""Evaluation: what the trial measures. `presence.py`: presence and retention on generated images (the
detector decides); `proxy.py`: the cheap denoising-loss signal of resurgence; `pictures.py`: the sample grids.

presence(c) = fraction of images generated from concept c's prompts that the detector assigns to c,
among the classes {all concepts of the experiment} + extra classes (docs/background.md §4).
retention   = mean presence of the *other* concepts on their own prompts (utility / specificity).
resurgence  = presence after fine-tuning - presence right after erasure (computed by the trial).
"""
