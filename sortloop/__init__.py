"""The application layer: what composes the core (`loop`) and the Label Studio adapter (`labeling`).

The CLI, the scheduled jobs and `serve`, the demo, status, report and bundle. Imports point down only:
the core never imports `labeling` or `sortloop`, and `labeling` never imports `sortloop`.
"""
