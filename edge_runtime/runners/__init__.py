"""Inference backends behind one runner contract (see ``base``)."""
