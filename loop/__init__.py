"""sortloop's core library: the loop's stages as sub-packages, importing only downwards.

The kernel is this folder's own modules (errors, progress, atomic files, tables, config, workspace, Ray
plumbing); then `data` < `scoring` < `model` < `learning` < `review` < `sorting` < `folders`: each stage
may import the kernel and the stages before it (tests/unit/test_layers.py checks this). The Label Studio
adapter is the sibling package `labeling`, and the application (CLI, scheduled jobs, `serve`, demo,
status, report, bundle) is `sortloop`, which composes both. The core never imports `labeling` or `sortloop`.
"""

__version__ = "0.1.0"
