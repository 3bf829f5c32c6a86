"""Restoring a checkpoint, one room per concern: ``protocol`` (Saver.restore's steps across
ranks), ``targets`` (which variable reads what into which array), ``index`` (reading and
parsing the index), ``checks`` (every field of a hostile index checked before a byte is
read or a buffer allocated), ``planner`` (pure: index and wanted blocks -> the reads, as
plain data of the kinds in ``reads``), ``verify`` (CRC32C checks of the bytes read),
``fresh`` (reads into new arrays), ``in_place`` (two passes into the variables' own
arrays), ``slabs`` (regions not contiguous in the file, a slab of rows at a time) and
``small`` (many small whole tensors, column-wise).
"""
