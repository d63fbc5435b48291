"""The values a photo's `flag` takes in the manifest, one home for every module that sets or reads them.

Why a kernel module: sort, resort, the review queue, the audit, the Label Studio adapter and `status`
all set or test these strings, and the frozen sorter must import them without pandas.
"""

from __future__ import annotations

LOW_CONFIDENCE = "low_confidence"  # sort: the model is unsure which category
UNFAMILIAR = "unfamiliar"  # sort: unlike every labeled photo, copied to the unfamiliar folder (`_other`)
USER_MOVED = "user_moved"  # a person moved the copy to another category folder (a correction)
SELECTED = "selected"  # the review queue chose it to teach the model most (it had no flag)
SUSPECTED_MISLABEL = "suspected_mislabel"  # the audit thinks its label is wrong

FLAGS = (LOW_CONFIDENCE, UNFAMILIAR, USER_MOVED, SELECTED, SUSPECTED_MISLABEL)  # what `labels --flag` accepts
SELECTION_GUESS = "selection"  # `pred_model` of a guess the review queue's head made: no sort predicted the photo
MODEL_FLAGS = (LOW_CONFIDENCE, UNFAMILIAR)  # set from the model's output: "the flags marked this photo";
#                                              a re-sort may replace them, never a person's or the audit's
