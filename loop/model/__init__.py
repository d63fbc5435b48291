"""Model: backbones, cached features, the fitted head or fastai fine-tune, calibration, evaluation, the artifact.

May import the kernel, `loop.data` and `loop.scoring`: it builds and measures one model, not versions of it.
"""
