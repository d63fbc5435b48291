"""Scoring: how unsure a prediction is, which photos are worth a look, and the flag curves: maths on arrays.

May import the kernel and `loop.data` only: it knows probabilities and embeddings, not models or folders.
"""
