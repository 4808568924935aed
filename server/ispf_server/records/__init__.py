"""Packed fixed-width records: external sort and join, the spool, the operations.

The one place in the node that chooses C (`ispf._records`) or Python for record
work (`ops`); the rest of the node calls these and never asks which runs.

* `ops`: sort, merge, join, zip, select, fold, split and shuffle records, each in C
  where the module is built and in Python else (the same bytes).
* `extsort`: `ExternalSort` (sorting within a memory budget, spilling to disk),
  `join_sorted` (many to one), `unique` (the last record of each key),
  `ascending`, `shuffled`.
* `spool`: `TagSpool` (values on an unlinked temporary file) and `SpooledNids`.
"""

from ispf.errors import RepeatedKey
from ispf_server.records.extsort import (
    SHUFFLE_KEY,
    ExternalSort,
    ascending,
    join_sorted,
    shuffled,
    unique,
    upper_bound,
    written,
)
from ispf_server.records.ops import (
    has_repeat,
    merge_join,
    merge_sorted,
    select_fields,
    shuffle,
    shuffle_records,
    sort_inplace,
    split_records,
    split_unique,
    xor_fold,
    zip_into,
    zip_records,
)
from ispf_server.records.spool import SpooledNids, TagSpool

__all__ = [
    "SHUFFLE_KEY",
    "ExternalSort",
    "RepeatedKey",
    "SpooledNids",
    "TagSpool",
    "ascending",
    "has_repeat",
    "join_sorted",
    "merge_join",
    "merge_sorted",
    "select_fields",
    "shuffle",
    "shuffle_records",
    "shuffled",
    "sort_inplace",
    "split_records",
    "split_unique",
    "unique",
    "upper_bound",
    "written",
    "xor_fold",
    "zip_into",
    "zip_records",
]
