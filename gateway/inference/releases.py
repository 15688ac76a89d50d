"""Installed model releases on a device or gateway, and the one atomic step that switches between them.

    <root>/releases/<model>-<version>-<digest12>/   release.sgwrel (as signed), manifest.json, the files
    <root>/<model>.active   -> releases/...          a symlink; the switch is a rename over it
    <root>/<model>.previous -> releases/...          what was active before (rollback)
    <root>/staging/<digest>.part                     a release arriving in chunks (gateway/agent/models.py)

A release folder is written under a temporary name and renamed into place, so a crash leaves either no
folder or a whole one; `switch` then renames a new symlink over `<model>.active`, so a reader sees the old
release or the new one, never a mix. Every load verifies release.sgwrel again (signature, file hashes)
and that the folder's manifest.json is the one the release makes: a file changed on disk is refused as
tampered, never run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.core import release as rel
from gateway.core.reasons import ReleaseReason
from gateway.errors import ConfigError, LocalError, ModelError
from gateway.pki.files import PRIVATE_DIR, fsync_dir, write_atomic

RELEASE_FILE = "release.sgwrel"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Trust:
    """What a verifier accepts: its trusted release keys (Ed25519, and ML-DSA-65 when it requires that
    signature too) and what it is (role, sensor kind or *)."""

    keys: Mapping[str, rel.PublicKey]
    role: str
    kind: str
    pq_keys: Mapping[str, rel.PublicKey] = field(default_factory=dict)

    def verify(self, blob: bytes, *, installed_version: str | None, model: str | None = None) -> rel.Release:
        return rel.verify(blob, trusted=self.keys, role=self.role, kind=self.kind,
                          installed_version=installed_version, model=model, pq_trusted=self.pq_keys)


def load_trust(public_key_file: Path, *, role: str, kind: str, key: str,
               pq_public_key_file: Path = Path(), pq_key: str = "") -> Trust:
    """The trusted release keys from their files. public_key_file Path() = none: every release is refused
    as unknown_key. pq_public_key_file Path() = no ML-DSA-65 signature required."""
    keys = _read_keys(public_key_file, rel.trust, key) if public_key_file != Path() else {}
    pq = _read_keys(pq_public_key_file, rel.pq_trust, pq_key) if pq_public_key_file != Path() else {}
    return Trust(keys, role, kind, pq)


def _read_keys(path: Path, parse: Callable[[bytes], dict[str, rel.PublicKey]], key: str
               ) -> dict[str, rel.PublicKey]:
    try:
        return parse(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, LocalError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass(frozen=True)
class Installed:
    release: rel.Release
    folder: Path

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST_FILE


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.staging = root / "staging"
        for d in (root, self.releases, self.staging):
            d.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)

    def _link(self, model: str, which: str) -> Path:
        return self.root / f"{model}.{which}"

    def folder(self, model: str, which: str = "active") -> Path | None:
        link = self._link(model, which)
        if not link.is_symlink():
            return None
        return self.root / link.readlink()

    def install(self, release: rel.Release, blob: bytes) -> Path:
        """Write a verified release's folder (not yet active). Idempotent for the same release."""
        name = f"{release.model}-{release.version}-{release.digest[:12]}"
        final = self.releases / name
        if final.is_dir():
            return final
        tmp = self.releases / f".{name}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir(mode=0o755)
        try:
            for fname, data in release.files.items():
                write_atomic(tmp / fname, data, fsync=True)
            write_atomic(tmp / MANIFEST_FILE, release.manifest_document(), fsync=True)
            write_atomic(tmp / RELEASE_FILE, blob, fsync=True)
            tmp.rename(final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.is_dir():  # another process (a gateway worker) installed the same release first
                return final
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.releases)
        return final

    def switch(self, model: str, folder: Path) -> None:
        """Make `folder` the active release of `model` in one rename; the old one becomes previous."""
        current = self.folder(model)
        if current is not None and current.resolve() == folder.resolve():
            return
        target = os.path.relpath(folder, self.root)
        if current is not None:
            self._relink(model, "previous", os.path.relpath(current, self.root))
        self._relink(model, "active", target)

    def rollback(self, model: str) -> Path | None:
        """Swap active and previous (the previous one is verified again when it is loaded). With no
        previous release the active one becomes previous and none is active: the packaged model runs.
        Rolling back twice returns to where it started."""
        active, previous = self.folder(model), self.folder(model, "previous")
        if previous is None or not previous.is_dir():
            if active is None:
                raise ModelError(f"no release of {model} is installed: nothing to roll back")
            self._link(model, "active").replace(self._link(model, "previous"))
            fsync_dir(self.root)
            return None
        self._relink(model, "active", os.path.relpath(previous, self.root))
        if active is not None:
            self._relink(model, "previous", os.path.relpath(active, self.root))
        else:
            self._link(model, "previous").unlink()
            fsync_dir(self.root)
        return previous

    def _relink(self, model: str, which: str, target: str) -> None:
        link = self._link(model, which)
        tmp = self.root / f".{link.name}.{secrets.token_hex(4)}"
        tmp.symlink_to(target)
        tmp.replace(link)
        fsync_dir(self.root)

    def load(self, model: str, trust: Trust, which: str = "active") -> Installed | None:
        """The installed release, verified again; None when there is none. ReleaseRefusedError when its
        folder no longer holds what was signed (the caller counts it and falls back)."""
        folder = self.folder(model, which)
        if folder is None:
            return None
        try:
            blob = (folder / RELEASE_FILE).read_bytes()
            manifest = (folder / MANIFEST_FILE).read_bytes()
        except OSError:
            raise rel.ReleaseRefusedError(ReleaseReason.TAMPERED, f"{folder.name} is incomplete") from None
        # installed_version None: it was checked against what ran when it was installed
        release = trust.verify(blob, installed_version=None, model=model)
        if manifest != release.manifest_document():
            changed = f"{folder.name}/{MANIFEST_FILE} was changed"
            raise rel.ReleaseRefusedError(ReleaseReason.TAMPERED, changed)
        return Installed(release, folder)

    def version(self, model: str, which: str = "active") -> str | None:
        """The version of an installed release from its folder name (no verification: for status only)."""
        folder = self.folder(model, which)
        if folder is None:
            return None
        parts = folder.name.rsplit("-", 2)
        return parts[1] if len(parts) == 3 else None

    def clear_staging(self, keep: str | None = None) -> None:
        for p in self.staging.iterdir():
            if keep is None or not p.name.startswith(keep):
                with contextlib.suppress(OSError):
                    p.unlink()
