"""Pure functions over bytes for TensorFlow's V2 checkpoint format.

Nothing in this package does I/O or imports fsspec or mpi4py; docs/FORMAT.md describes
the byte layout that these modules implement.
"""
