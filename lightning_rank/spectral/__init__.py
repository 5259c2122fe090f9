"""Spectra: energy and effective ranks and round-off bounds (:mod:`.spectrum`), certified ranks (:mod:`.certify`),
:func:`~lightning_rank.analyze` (:mod:`.analysis`) and its :class:`~lightning_rank.RankReport` (:mod:`.report`)."""
