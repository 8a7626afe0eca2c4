"""The vector + keyword index of the Knowledge Service (LanceDB).

`LanceChunkIndex` implements the `ChunkIndex` port; `maintenance` runs its
background compaction; `location` turns settings into a LanceDB connection.
"""
