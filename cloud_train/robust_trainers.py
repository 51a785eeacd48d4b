"""Multi-step adversarial trainers (PGD-AT, TRADES, ROA), registered into ``cloud_train.train``."""

from __future__ import annotations
