"""Compression: low-rank layers (:mod:`.layers`), their factors (:mod:`.factors`), rank allocation under a budget
(:mod:`.candidates`, :mod:`.probe`, :mod:`.allocation`), planning (:mod:`.selection`, :mod:`.planning`,
:mod:`.factorize`, :mod:`.results`) and reloading factorized checkpoints (:mod:`.loading`)."""
