"""Folders: after a sort, the sorted trees follow the labels (apply, resort, undo) and teach them (user moves).

The top stage of `loop`: may import every other stage; only `labeling` and `sortloop` import it.
"""
