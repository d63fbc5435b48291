"""sortloop: sort photos into category folders with a classifier that learns from its users.

Three layers, imports pointing down: the core library lives here (manifest, ingest, train, sort, ...);
the Label Studio adapter is the sibling package `labeling`, which builds on the core; the application
(CLI, scheduled jobs, `serve`, demo, status) is `loop.app`, which composes both. The core never imports
`labeling` or `loop.app`.
"""

__version__ = "0.1.0"
