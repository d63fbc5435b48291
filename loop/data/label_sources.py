"""Where a photo's label came from: `label_source` in the manifest, `source` in the label history.

One home for the values, so a misspelt source is an import error, not a filter that silently matches nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the standalone sorter reads the values below and has no pandas
    import pandas as pd

FOLDER = "folder"  # the user's labeled set: a class folder (`ingest --labeled`, the demo) or a CSV of labels
REVIEW = "review"  # a reviewer in Label Studio (`review pull`)
USER_MOVE = "user_move"  # a person moved a sorted copy into another category folder (`scan`)
# Labels a person gave after sorting: they always train (never in the ingested gate set) and are the gate's
# evidence on "your sorted photos" out of fold; flags never replace them.
HUMAN_SOURCES = (REVIEW, USER_MOVE)
LABEL_SOURCES = (FOLDER, *HUMAN_SOURCES)


def labeled_after_sorting(rows: pd.DataFrame) -> np.ndarray | None:
    """(N,) bool: which rows a person labeled after sorting (the shop's own photos); None without the column."""
    if "label_source" not in rows:
        return None
    return rows["label_source"].isin(HUMAN_SOURCES).fillna(False).to_numpy(bool)
