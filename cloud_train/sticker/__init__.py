"""Physical adversarial stickers: optimisation, print files, placement."""
