"""Review: which photos a person should look at next (the review queue) and which labels look wrong (audit).

May import the kernel, `loop.data`, `loop.scoring`, `loop.model` and `loop.learning`; never Label Studio.
"""
