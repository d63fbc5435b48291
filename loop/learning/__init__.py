"""Learning: train a candidate on the manifest, keep every version in the registry, gate and deploy it.

May import the kernel, `loop.data`, `loop.scoring` and `loop.model`; nothing that reads sorted folders.
"""
