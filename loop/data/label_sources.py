"""Where a photo's label came from: `label_source` in the manifest, `source` in the label history.

One home for the values, so a misspelt source is an import error, not a filter that silently matches nothing.
"""

from __future__ import annotations

FOLDER = "folder"  # the user's labeled set: a class folder (`ingest --labeled`, the demo) or a CSV of labels
REVIEW = "review"  # a reviewer in Label Studio (`review pull`)
USER_MOVE = "user_move"  # a person moved a sorted copy into another category folder (`scan`)
# Labels a person gave after sorting: they always train (never in the ingested gate set) and are the gate's
# evidence on "your sorted photos" out of fold; flags never replace them.
HUMAN_SOURCES = (REVIEW, USER_MOVE)
LABEL_SOURCES = (FOLDER, *HUMAN_SOURCES)
