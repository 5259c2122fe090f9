"""Statistics: the rows of each layer input (:mod:`.rows`), hooks that stream them (:mod:`.collector`) into sums
``sum x x^T``, ``sum x``, ``n`` (:mod:`.sums`), and :func:`~lightning_rank.collect` (:mod:`.collect`)."""
