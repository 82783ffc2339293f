"""Batch scoring and backfills: the served model and the same point-in-time features over many rows.

The input (Parquet files, or a time range of the prediction log) is cut into partitions (:mod:`.inputs`); each
partition is read in chunks, checked, joined with the store features as of each row's time and scored
(:mod:`.scoring`), and written as one output file, atomically: finished partitions are what a resumed job
skips. The same partition function runs in this process or on Ray (:mod:`.engines`), locally or on a cluster.
"""
