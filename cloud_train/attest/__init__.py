"""Stage 2: signed stage attestations against mid-pipeline tampering.

Each preprocessing stage (decode, normalise, augment, shard) writes its outputs plus an
in-toto Statement v1 in a DSSE envelope signed with that stage's own Ed25519 key;
``verify_pipeline`` recomputes every hash, checks every signature against the root-signed
stage policy, checks the chain and screens the data each stage passes on for drift.
See ``cloud_train/attest/README.md`` for the formats. Import from the submodules
(``policy``, ``stages``, ``verify``), so building the CLI parser stays cheap.
"""
