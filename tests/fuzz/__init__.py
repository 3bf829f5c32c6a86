"""A standing fuzz suite for shardsave's index parsing and restore paths (issue 11).

Valid checkpoints made by shardsave itself (seeds.py) are mutated at the level of the
decoded index entries and at the byte level, with the table block checksums and, when a
case asks for it, the entry checksums recomputed, so a mutation reaches the code behind the
checksum layer, as a crafted file would (mutate.py). Every case is run by a persistent
worker process under an address-space limit and a time limit (worker.py, pool.py) through
every read and restore path; the only acceptable outcomes are a ShardsaveError or values
that agree with the bytes in the data files (oracle.py). engine.py classifies and
deduplicates findings and saves each as a case file that ``python -m tests.fuzz.replay``
runs again.
"""
