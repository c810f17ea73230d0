"""Search indexes over the stored keys of each global attention layer: graph (ours), hnsw, flat.

Every layer index answers `search(queries [H, q, D], k, ef) -> SearchResult` with ids into the
layer's indexed range [lo, hi) (position = lo + id), raw scores and counted distance evaluations.
`stored` builds them into a store and opens them from one.
"""

from ra_cli.choices import IndexKind
from ra_cli.index.base import KINDS, IndexParams, SearchResult, indexed_range
from ra_cli.index.stored import build_store_indexes, index_files, open_layer_index

__all__ = ["KINDS", "IndexKind", "IndexParams", "SearchResult", "indexed_range", "build_store_indexes", "open_layer_index",
           "index_files"]
