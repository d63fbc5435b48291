"""Everything that talks to Label Studio: the embedded server, project bootstrap, push and pull.

`labeling` depends on `loop` (manifest, workspace, errors), never the other way round.
Caveat: the embedded server needs the `sortloop[labelstudio]` extra in the same environment.
"""
