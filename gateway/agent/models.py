"""The agent's prefilter as a signed release: which one runs, releases arriving in chunks, the switch.

At start the agent runs its store's active release (verified again), else (when that is refused) the
previous one, else the packaged manifest's model (also when no release is active: rolled back to it);
a release that fails verification is refused with its reason (counted in sgw_agent_model_refused_total,
logged) and the next candidate runs. A deploy (`sgw model deploy`) sends
the release in ModelChunk commands: each chunk's hash is checked, it is written at its offset in
staging/<release id>.part and fsynced before the reply asks for the next, so a killed agent resumes from
its last whole chunk. The last chunk completes the file; it is verified as a whole (the release id is
its sha256, then gateway/core/release.py), installed beside the active release, loaded into LiteRT,
and only then made active by one rename; the running prefilter serves every window until the caller
swaps it in between two windows. The switch is then on probation (gateway/agent/probation.py): confirmed
after [model] probation_windows windows and a passed self-test, else undone by the agent itself, also
when it finds the switch unconfirmed at start (it crashed, or the release fails to load, fit or test).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy.typing as npt

from gateway.agent.config import AgentConfig
from gateway.agent.metrics import AgentMetrics
from gateway.agent.probation import ANY_FOLDER, HealthyWindows, Pending, ProbationFiles, RolledBack, selftest
from gateway.core import release as rel
from gateway.core.downlink import chunk_count
from gateway.core.reasons import ReleaseReason, RollbackReason
from gateway.errors import ModelError
from gateway.inference.engine import Prefilter, load_prefilter
from gateway.inference.releases import Installed, ModelStore, Trust, load_trust
from gateway.pb import downlink_pb2 as dpb

log = logging.getLogger("sgw.agent.models")

MODEL = "prefilter"
Fits = Callable[[Prefilter], str | None]


@dataclass
class ChunkResult:
    error: str | None = None
    values: dict[str, str] = field(default_factory=dict)
    switched: Prefilter | None = None  # the new prefilter, already active on disk: swap it in


class AgentModels:
    def __init__(self, cfg: AgentConfig, metrics: AgentMetrics) -> None:
        self._metrics = metrics
        self.trust: Trust = load_trust(cfg.model.release_public_key_file, role="agent", kind=cfg.device.kind,
                                       key="model.release_public_key_file",
                                       pq_public_key_file=cfg.model.release_pq_public_key_file,
                                       pq_key="model.release_pq_public_key_file")
        self.store = ModelStore(cfg.model_store)
        self._manifest = cfg.filter.manifest if cfg.filter.manifest != Path() else None
        self.version = ""  # "prefilter-1.1.0": what runs
        self.digest = ""  # the release id of what runs ("" for the packaged model)
        self.staged = ""
        self._policy = cfg.model
        self.probation = ProbationFiles(self.store.root, MODEL)
        self.healthy = HealthyWindows(cfg.model.selftest_windows)
        self.pending: Pending | None = None  # the switch on probation, None once confirmed
        self.served = 0  # windows the release on probation has scored since this start
        self.rolled_back: RolledBack | None = self.probation.rolled_back()
        self.current: Prefilter | None = None
        # False while a per-device baseline scores the windows ([commission]): the prefilter release is
        # installed but judges nothing, so a switch to it is not put on probation (it could never end)
        self.judges = True

    # -- start-up ------------------------------------------------------------------------------------
    def load(self, fits: Fits | None = None) -> Prefilter:
        pending = self.probation.pending()
        if pending is not None:
            resumed = self._resume_probation(pending, fits)
            if resumed is not None:
                return resumed
        for which in ("active", "previous"):
            try:
                installed = self.store.load(MODEL, self.trust, which)
            except rel.ReleaseRefusedError as exc:
                self.refused(exc.why, str(exc), where=which)
                continue
            if installed is None:
                # no active link: the packaged model was rolled back to (previous is what it left)
                break
            try:
                return self._activated(installed, self._run(installed))
            except ModelError as exc:
                self.refused(ReleaseReason.TAMPERED, str(exc), where=which)
        return self._packaged(self._load_packaged())

    def _load_packaged(self) -> Prefilter:
        return load_prefilter(manifest=self._manifest, accelerator="cpu", num_threads=1)

    def _resume_probation(self, pending: Pending, fits: Fits | None) -> Prefilter | None:
        """A start with the last switch unconfirmed: counted first (a crash on the way counts too), then
        the new release must load, fit and pass the self-test, else the previous one runs again."""
        active = self.store.folder(MODEL)
        if not self.judges or active is None or pending.folder not in (ANY_FOLDER, active.name):
            # killed before the rename, or the prefilter judges nothing here: no probation
            self.probation.clear_pending()
            return None
        pending.starts += 1
        self.probation.write_pending(pending)
        if pending.starts > self._policy.max_unconfirmed_starts:
            return self._undo(pending, RollbackReason.CRASH_LOOP,
                              f"{pending.starts - 1} starts without reaching the confirmation")
        try:
            installed = self.store.load(MODEL, self.trust)
            prefilter = self._run(installed) if installed is not None else None
        except rel.ReleaseRefusedError as exc:
            self.refused(exc.why, str(exc), where="active")
            return self._undo(pending, RollbackReason.LOAD, str(exc))
        except ModelError as exc:
            return self._undo(pending, RollbackReason.LOAD, str(exc))
        if installed is None or prefilter is None:
            return self._undo(pending, RollbackReason.LOAD, "the active release is gone")
        misfit = fits(prefilter) if fits is not None else None
        if misfit is not None:
            return self._undo(pending, RollbackReason.MISFIT, misfit)
        test = selftest(prefilter, self.probation.load_healthy(), self._policy.selftest_max_forward)
        if not test.ok:
            return self._undo(pending, RollbackReason.SELFTEST, test.describe())
        self.pending, self.served = pending, 0
        self._metrics.model_probation.set(1)
        log.warning("model switch not yet confirmed at start: on probation again", extra={"fields": {
            "model": MODEL, "version": pending.to_version, "starts": pending.starts,
            "selftest": test.describe()}})
        return self._activated(installed, prefilter)

    def _undo(self, pending: Pending, reason: RollbackReason, detail: str) -> Prefilter:
        """At start: back to what ran before the unconfirmed switch (verified again; the packaged model
        when that fails too or there was none)."""
        self.store.rollback(MODEL)
        prefilter: Prefilter | None = None
        try:
            installed = self.store.load(MODEL, self.trust)
            if installed is not None:
                prefilter = self._activated(installed, self._run(installed))
        except rel.ReleaseRefusedError as exc:
            self.refused(exc.why, str(exc), where="active")
        except ModelError as exc:
            self.refused(ReleaseReason.TAMPERED, str(exc), where="active")
        if prefilter is None:
            prefilter = self._packaged(self._load_packaged())
        self._rolled_back(pending, reason, detail)
        return prefilter

    def _rolled_back(self, pending: Pending, reason: RollbackReason, detail: str) -> None:
        self.pending = None
        self._metrics.model_probation.set(0)
        self.rolled_back = RolledBack(f"{MODEL}-{pending.to_version}", self.version, reason.value,
                                      detail[:200])
        self.probation.write_rolled_back(self.rolled_back)
        self.probation.clear_pending()
        self._metrics.model_rollbacks.labels(reason=reason.value).inc()
        log.error("model rolled back by itself", extra={"fields": {
            "model": MODEL, "from": self.rolled_back.from_version, "to": self.version, "reason": reason.value,
            "detail": detail[:200], "starts": pending.starts}})

    # -- probation -----------------------------------------------------------------------------------
    def observe(self, samples: npt.ArrayLike, anomalous: bool, fits: Fits | None = None) -> Prefilter | None:
        """After each window the running prefilter scored: keeps the healthy ones (the next switch's
        self-test); on probation, counts it and at the end judges the switch. Returns the prefilter to
        swap in when the switch was undone."""
        if self.pending is None:
            if not anomalous:
                self.healthy.add(samples)
            return None
        self.served += 1
        if self.served < self._policy.probation_windows or self.current is None:
            return None
        pending = self.pending
        test = selftest(self.current, self.probation.load_healthy(), self._policy.selftest_max_forward)
        if test.ok:
            self.pending = None
            self._metrics.model_probation.set(0)
            self.probation.clear_pending()
            # the ring keeps its windows (the new release passed on them) and fills on from here
            log.info("model switch confirmed", extra={"fields": {
                "model": MODEL, "version": pending.to_version, "windows": self.served,
                "selftest": test.describe()}})
            return None
        result = self.rollback(fits)
        if result.switched is None:  # could not go back: keep running it, say so, judge no more
            self.pending = None
            self.probation.clear_pending()
            log.error("model self-test failed and the rollback failed", extra={"fields": {
                "model": MODEL, "version": pending.to_version, "error": result.error}})
            return None
        self._rolled_back(pending, RollbackReason.SELFTEST, test.describe())
        return result.switched

    @property
    def probation_text(self) -> str:
        return f"{self.served}/{self._policy.probation_windows}" if self.pending is not None else ""

    def _packaged(self, prefilter: Prefilter) -> Prefilter:
        self.version = f"{prefilter.model.name}-{prefilter.model.version}"
        self.digest = ""
        self.current = prefilter
        self._metrics.model_info.clear()
        self._metrics.model_info.labels(model=MODEL, version=prefilter.model.version).set(1)
        return prefilter

    @staticmethod
    def _run(installed: Installed) -> Prefilter:
        return load_prefilter(manifest=installed.manifest, accelerator="cpu", num_threads=1)

    def _activated(self, installed: Installed, prefilter: Prefilter) -> Prefilter:
        self.version = f"{prefilter.model.name}-{prefilter.model.version}"
        self.digest = installed.release.digest
        self.current = prefilter
        self._metrics.model_info.clear()
        self._metrics.model_info.labels(model=MODEL, version=installed.release.version).set(1)
        log.info("model release loaded", extra={"fields": {
            "model": MODEL, "version": installed.release.version, "digest": installed.release.digest[:16]}})
        return prefilter

    def refused(self, reason: ReleaseReason, message: str, *, where: str) -> None:
        self._metrics.model_refused.labels(reason=reason.value).inc()
        log.error("model release refused", extra={"fields": {"reason": reason.value, "where": where,
                                                              "error": message}})

    # -- deploy --------------------------------------------------------------------------------------
    def chunk(self, chunk: dpb.ModelChunk, running_version: str,
              fits: Callable[[Prefilter], str | None] | None = None) -> ChunkResult:
        """One ModelChunk (already bounded by core.downlink.chunk_problem). The reply's values say the
        next index wanted; a complete release is verified, installed and switched to."""
        rid = chunk.release_id
        count = chunk_count(chunk)
        if rid == self.digest:  # runs already: nothing to send (a deploy to a whole kind, run again)
            return ChunkResult(None, {"next": str(count), "chunks": str(count), "already": "1",
                                      "installed": self.version.removeprefix(f"{MODEL}-")})
        if not self.trust.keys:  # nothing could verify: refused before a byte is staged
            return self._refuse(ReleaseReason.UNKNOWN_KEY, "no trusted release key ([model] "
                                "release_public_key_file)", {"next": "0", "chunks": str(count)})
        self.store.clear_staging(keep=rid)  # one release stages at a time: a new one replaces the last
        part = self.store.staging / f"{rid}.part"
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            have = min(size // chunk.chunk_bytes, count)
            if size == chunk.total_bytes:
                have = count
            elif size != have * chunk.chunk_bytes:
                os.ftruncate(fd, have * chunk.chunk_bytes)  # a chunk torn by a crash: fetched again
            if chunk.data and chunk.index == have:
                if hashlib.sha256(chunk.data).digest() != chunk.sha256:
                    return self._reply(have, count, rid, chunk, error="chunk hash mismatch; send it again")
                os.pwrite(fd, chunk.data, chunk.index * chunk.chunk_bytes)
                os.fsync(fd)
                have += 1
            elif chunk.data and chunk.index > have:
                return self._reply(have, count, rid, chunk, error=f"out of order: next is {have}")
        finally:
            os.close(fd)
        if have < count:
            return self._reply(have, count, rid, chunk)
        return self._complete(part, rid, count, running_version, fits)

    def _reply(self, have: int, count: int, rid: str, chunk: dpb.ModelChunk, error: str | None = None
               ) -> ChunkResult:
        self.staged = f"{rid[:16]} {min(have * chunk.chunk_bytes, chunk.total_bytes)}/{chunk.total_bytes}"
        return ChunkResult(error, {"next": str(have), "chunks": str(count)})

    def _complete(self, part: Path, rid: str, count: int, running_version: str,
                  fits: Callable[[Prefilter], str | None] | None) -> ChunkResult:
        done = {"next": str(count), "chunks": str(count)}
        blob = part.read_bytes()
        part.unlink()
        self.staged = ""
        if hashlib.sha256(blob).hexdigest() != rid:
            return self._refuse(ReleaseReason.TAMPERED, "the assembled release does not match its id", done)
        installed_version = running_version.removeprefix(f"{MODEL}-") if running_version.startswith(
            f"{MODEL}-") else None
        try:
            release = self.trust.verify(blob, installed_version=installed_version, model=MODEL)
        except rel.ReleaseRefusedError as exc:
            return self._refuse(exc.why, str(exc), done)
        folder = self.store.install(release, blob)
        try:
            prefilter = self._run(Installed(release, folder))  # LiteRT has it before anything switches
        except ModelError as exc:
            return ChunkResult(f"the release does not load: {exc}"[:200], done)
        misfit = fits(prefilter) if fits is not None else None
        if misfit is not None:
            return ChunkResult(f"the release does not fit this sensor: {misfit}"[:200], done)
        self.probation.write_rolled_back(None)
        self.rolled_back = None
        pending = Pending(release.version, running_version, folder.name)
        if self.judges:
            # durable before the rename: a crash from here on finds the switch unconfirmed at start
            self.probation.save_healthy(self.healthy.snapshot())
            self.probation.write_pending(pending)
        self.store.switch(MODEL, folder)
        self._activated(Installed(release, folder), prefilter)
        if self.judges:
            self.pending, self.served = pending, 0
            self._metrics.model_probation.set(1)
        self._metrics.model_switches.inc()
        log.info("model switched", extra={"fields": {"model": MODEL, "version": release.version,
                                                     "previous": running_version,
                                                     "probation_windows": self._policy.probation_windows}})
        probation = {"probation": str(self._policy.probation_windows)} if self.judges else {}
        return ChunkResult(None, {**done, "installed": release.version, **probation}, prefilter)

    def rollback(self, fits: Fits | None = None) -> ChunkResult:
        """Back to the previous release (`sgw model rollback`): an explicit operator command, so no
        downgrade check, but it is verified again like every load. Nothing changes if it fails."""
        running = self.version
        try:
            self.store.rollback(MODEL)
        except ModelError as exc:
            return ChunkResult(str(exc))
        try:
            installed = self.store.load(MODEL, self.trust)
            # None: back to the packaged model (the first release had nothing before it)
            prefilter = self._load_packaged() if installed is None else self._run(installed)
        except rel.ReleaseRefusedError as exc:
            self.store.rollback(MODEL)  # swap back: what ran keeps running
            self.refused(exc.why, str(exc), where="rollback")
            return ChunkResult(f"refused: {exc.why.value}", {"refused": exc.why.value})
        except ModelError as exc:
            self.store.rollback(MODEL)
            return ChunkResult(f"the previous release does not load: {exc}"[:200])
        misfit = fits(prefilter) if fits is not None else None
        if misfit is not None:
            self.store.rollback(MODEL)
            return ChunkResult(f"the previous release does not fit this sensor: {misfit}"[:200])
        if installed is None:
            self._packaged(prefilter)
        else:
            self._activated(installed, prefilter)
        if self.pending is not None:  # an operator's rollback ends a probation: nothing left to judge
            self.pending = None
            self._metrics.model_probation.set(0)
            self.probation.clear_pending()
        self._metrics.model_switches.inc()
        version = prefilter.model.version
        log.info("model rolled back", extra={"fields": {"model": MODEL, "version": version,
                                                        "previous": running}})
        return ChunkResult(None, {"installed": version, "rolled_back_from": running}, prefilter)

    def _refuse(self, reason: ReleaseReason, message: str, values: dict[str, str]) -> ChunkResult:
        self.refused(reason, message, where="deploy")
        return ChunkResult(f"refused: {reason.value}", {**values, "refused": reason.value})
