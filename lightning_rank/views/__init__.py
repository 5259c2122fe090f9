"""What users look at in TensorBoard: tag names, descriptions and the layout (:mod:`.tags`), figures (:mod:`.figures`,
drawn by :mod:`.drawing`), tables (:mod:`.tables`), and the writers that log them (:mod:`.writers`)."""
