"""Cloud tier: the synthetic sign world, GTSRB I/O, models, attacks, robust training."""
