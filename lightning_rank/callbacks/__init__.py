"""The Lightning callbacks :class:`~lightning_rank.RankMonitor` (:mod:`.monitor`) and
:class:`~lightning_rank.RankCompression` (:mod:`.compression`), what they share (:mod:`.base`, one validation epoch's
statistics in :mod:`.epoch`, their sum over processes in :mod:`.distributed`), and every Lightning internal they use
(:mod:`._lightning`)."""
