"""Stage 1: the ingest gate. Signed source batches are checked sample by sample and end
ACCEPTED or QUARANTINED (or, for a bad source or signature, REJECTED whole).

Modules: ``batch`` (format, safe reading, ``make_batch``), ``registry`` (signed source
allow-list), ``screens`` (schema checks, hand-made features, KS), ``reference`` (the
trusted reference: Isolation Forest, range, KS and label-consistency screens), ``embed``
(the label screen's CNN, trained on the reference only and cached), ``batch_screens``
(the per-class trigger screen), ``forest`` (the Isolation Forest as arrays), ``gate``
(the pipeline and its journal), ``store`` (quarantine list / show / release),
``attacks`` (poisoned and forged batches), ``cli`` (``add_ingest_parsers``).
"""
