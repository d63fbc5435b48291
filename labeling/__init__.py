"""Everything that talks to Label Studio: the embedded server, project bootstrap, push and pull.

`labeling` depends on `loop` (manifest, workspace, errors), never the other way round. It talks to
Label Studio through label-studio-sdk 2.x (`labeling.client`), so legacy tokens and Personal Access
Tokens both work.
Caveat: the embedded server needs the `sortloop[labelstudio]` extra in the same environment.
"""
