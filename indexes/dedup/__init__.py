"""Dedup, a room of its own: exact and near duplicates across a corpus, and train/test leakage.

tiers (exact / phash / embedding, one implementation for both jobs) -> groups (components split
against chaining, keep policy) -> review (tables, lists, report); ivf_join finds embedding pairs
list by list, calibrate measures thresholds on planted copies, corpus holds the rows compared.
"""
from imgindex.indexes.dedup.find import DedupResult, find_duplicates, find_leaks
from imgindex.indexes.dedup.tiers import DedupOptions

__all__ = ["DedupOptions", "DedupResult", "find_duplicates", "find_leaks"]
