"""The input dialect moved to `q3vl.preprocess.adapter` (the one item adapter of every front end);
these names stay importable from here.
"""

from q3vl.preprocess.adapter import ID, Record, ids, locate, parse_item, read_items, read_object, resolve_media

__all__ = ["ID", "Record", "ids", "locate", "parse_item", "read_items", "read_object", "resolve_media"]
