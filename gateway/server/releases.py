"""Signed model releases on the gateway: which manifest each routed model loads from, at start-up.

Each file in [inference] releases is verified (gateway/core/release.py) as the gateway's: role gateway,
a model it routes, not below the version installed (its store's active release, else the manifest's).
A good one is installed into the store beside registry.db (`<registry>.models`, gateway/inference/
releases.py) and made active; a refused one is counted in sgw_gateway_model_refused_total{reason} and
logged, and the model keeps running what it ran before: the store's active release (verified again),
else the manifest. On SIGHUP the gateway resolves the list again and swaps a model whose active release
changed while it runs (gateway/server/service.py reload_models, MqttShell.swap_models).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gateway.core import release as rel
from gateway.core.reasons import ReleaseReason
from gateway.inference.manifest import load_manifest
from gateway.inference.releases import ModelStore, Trust

log = logging.getLogger("sgw.gateway.releases")


def resolve(releases: Sequence[Path], trust: Trust, store: ModelStore, *, manifest: Path | None,
            models: Iterable[str], refused: dict[str, int]) -> dict[str, Path]:
    """model name -> the manifest to load it from, for the models that run from a release (the rest use
    `manifest`). Refusals are added to `refused` by reason."""
    wanted = set(models)
    packaged: Mapping[str, str] = {n: s.version for n, s in load_manifest(manifest).models.items()}

    def refuse(why: ReleaseReason, message: str, where: str) -> None:
        refused[why.value] = refused.get(why.value, 0) + 1
        log.error("model release refused", extra={"fields": {"reason": why.value, "release": where,
                                                              "error": message}})

    for path in releases:
        blob = path.read_bytes()
        name = rel.claimed_model(blob) or ""
        if name not in wanted:  # not a release (malformed), or of a model this gateway does not route
            refuse(ReleaseReason.WRONG_TARGET if name else ReleaseReason.MALFORMED,
                   f"model {name} is not routed here" if name else "not a release", str(path))
            continue
        try:
            release = trust.verify(blob, installed_version=store.version(name) or packaged.get(name),
                                   model=name)
        except rel.ReleaseRefusedError as exc:
            refuse(exc.why, str(exc), str(path))
            continue
        store.switch(release.model, store.install(release, blob))
        log.info("model release installed", extra={"fields": {"model": release.model,
                                                               "version": release.version,
                                                               "digest": release.digest[:16]}})
    out: dict[str, Path] = {}
    for name in sorted(wanted):
        try:
            active = store.load(name, trust)
        except rel.ReleaseRefusedError as exc:
            refuse(exc.why, str(exc), f"{store.root}/{name}.active")
            continue
        if active is not None:
            out[name] = active.manifest
    return out
