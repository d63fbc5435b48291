"""The application layer: what composes the core (`loop`) and the Label Studio adapter (`labeling`).

The CLI, the scheduled jobs and `serve`, the demo, and `status`. Imports point down only: the core never
imports `labeling` or `loop.app`, and `labeling` never imports `loop.app`.
"""
