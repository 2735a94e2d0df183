"""Tree helpers for writing transformations (a stable public path; the code lives in
:mod:`gradchain._tree`, :mod:`gradchain._ops` and :mod:`gradchain.state`).

Every tree in gradchain is an optree pytree flattened with ``none_is_leaf=True``, so a
``None`` gradient keeps its place and lines up with the parameter and state it belongs to.
"""

from gradchain._ops import global_norm
from gradchain._tree import (
    Leaves,
    flatten,
    flatten_like,
    group_by_device_dtype,
    leaf_paths,
    unflatten,
    zeros_like_tree,
)
from gradchain.state import config_fields, from_state_dict, to_state_dict, tree_get

__all__ = [
    "flatten",
    "unflatten",
    "flatten_like",
    "leaf_paths",
    "group_by_device_dtype",
    "global_norm",
    "tree_get",
    "to_state_dict",
    "from_state_dict",
    "config_fields",
    "zeros_like_tree",
    "Leaves",
]
