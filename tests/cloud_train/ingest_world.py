"""A gate store for the ingest tests: a root key, registered sources with their keys, a
trusted reference fitted on rendered signs, and a few clean images to build batches from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud_train.ingest import attacks as A
from cloud_train.ingest.gate import build_reference, init_store, store_paths
from cloud_train.ingest.reference import Reference, ScreenConfig
from cloud_train.ingest.registry import add_source
from roadshield_base.trust import generate_private_key


def gate_world(d: Path, sources: tuple[str, ...] = ("acme",), *, reference_per_class: int = 80,
               clean_per_class: int = 4, screen: ScreenConfig | None = None) -> dict[str, Any]:
    """{"dir", "root", "store", "imgs", "labels", "ref", and each source's private key by
    its name}; "prov" is the first source's key."""
    root = generate_private_key()
    store = d / "store"
    init_store(store, root.public_key())
    keys = {name: generate_private_key() for name in sources}
    for name, key in keys.items():
        add_source(store_paths(store)["registry"], root, name, key.public_key(),
                   "2026-01-01T00:00:00Z")
    imgs, labels = A.render_images(reference_per_class, seed=1)
    build_reference(store, imgs, labels, 14, screen or ScreenConfig(
        embed_epochs=2, embed_min_steps=30, embed_batch=32))
    clean_imgs, clean_labels = A.render_images(clean_per_class, seed=7)
    return {"dir": d, "root": root, "store": store, "imgs": clean_imgs, "labels": clean_labels,
            "ref": Reference.load(store / "reference"), "prov": keys[sources[0]], **keys}
