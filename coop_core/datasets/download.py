"""Opt-in, checksummed download and atomic extraction of dataset archives.

Nothing here runs unless the user asks for it (``load_dataset(..., download=True)`` / the ``--download`` flag). An
archive is fetched with :mod:`urllib` into a temporary file next to its destination, extracted into a temporary
directory next to its destination, verified with a *tree digest* (a hash of every file's relative path and content,
so it does not depend on how the archive was packed), and only then renamed into place. A failed or mismatching
download therefore never leaves a half-extracted image folder behind for the loader to trust.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset archive could not be downloaded, extracted or verified from any of its URLs."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(directory: str | Path, suffixes: Sequence[str] = (".jpg",)) -> str:
    """Content digest of a directory tree, independent of archive packing and file timestamps.

    The digest is the sha256 of the sorted lines ``"<relpath>\\t<sha256 of file>\\n"`` (UTF-8), one per file whose
    lower-cased suffix is in ``suffixes``, with ``relpath`` relative to ``directory`` in POSIX form.

    Args:
        directory: Root of the tree, e.g. ``<root>/eurosat/2750``.
        suffixes: File suffixes to include (lower case, with the dot).

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: If ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    wanted = {s.lower() for s in suffixes}
    lines = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            path = Path(dirpath) / filename
            if path.suffix.lower() in wanted:
                lines.append(f"{path.relative_to(directory).as_posix()}\t{sha256_file(path)}\n")
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def download_url(url: str, directory: Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` into a new temporary file inside ``directory`` and return its path.

    The caller owns (and must delete) the returned file. A partial download is removed before the error propagates.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            next_report = 0
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                if done >= next_report:
                    logger.info(
                        "downloading %s: %.1f / %s MiB", url, done / 2**20, f"{total / 2**20:.1f}" if total else "?"
                    )
                    next_report = done + 50 * 2**20
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _safe_extract(archive: zipfile.ZipFile, target: Path) -> None:
    """Extract every member under ``target``, refusing absolute paths and ``..`` (zip-slip)."""
    target_resolved = target.resolve()
    for member in archive.infolist():
        destination = (target / member.filename).resolve()
        if destination != target_resolved and target_resolved not in destination.parents:
            raise DownloadError(f"archive member escapes the extraction folder: {member.filename!r}")
    archive.extractall(target)


def _payload_dir(extracted: Path, top_dirs: Sequence[str]) -> Path:
    """The folder inside an extracted archive that holds the payload (e.g. the class folders)."""
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name in top_dirs:
        return entries[0]
    return extracted


def extract_zip_verified(
    archive_path: Path,
    destination: Path,
    *,
    top_dirs: Sequence[str] = (),
    expected_tree_sha256: str,
    suffixes: Sequence[str] = (".jpg",),
) -> Path:
    """Extract a zip archive to ``destination`` atomically, after verifying its content digest.

    The archive is extracted into a temporary folder next to ``destination``; if it has a top-level folder named in
    ``top_dirs`` that folder is the payload, otherwise the archive root is. The payload's :func:`tree_digest` must equal
    ``expected_tree_sha256``; then the payload is renamed to ``destination``. If another process finished first (the
    destination appeared meanwhile), its copy is kept.

    Args:
        archive_path: The downloaded zip.
        destination: Final folder, e.g. ``<root>/eurosat/2750``; must not exist yet.
        top_dirs: Accepted names of the archive's top-level folder, e.g. ``("EuroSAT_RGB", "2750")``.
        expected_tree_sha256: The digest the payload must have.
        suffixes: File suffixes covered by the digest.

    Returns:
        ``destination``.

    Raises:
        DownloadError: If the archive is not a valid zip, escapes its folder, or its digest does not match; nothing is
            left at ``destination`` and the temporary folder is removed.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.extract-"))
    try:
        try:
            with zipfile.ZipFile(archive_path) as archive:
                _safe_extract(archive, workdir)
        except zipfile.BadZipFile as err:
            raise DownloadError(f"{archive_path} is not a valid zip archive: {err}") from err
        payload = _payload_dir(workdir, top_dirs)
        actual = tree_digest(payload, suffixes)
        if actual != expected_tree_sha256:
            raise DownloadError(
                f"content digest mismatch for {archive_path.name}: expected {expected_tree_sha256}, got {actual}; "
                "the extracted files were removed"
            )
        try:
            os.replace(payload, destination)
        except OSError:
            if destination.is_dir():
                logger.info("%s appeared while extracting (another process finished first); keeping it", destination)
            else:
                raise
        return destination
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def download_and_extract(
    urls: Sequence[str],
    destination: Path,
    *,
    top_dirs: Sequence[str] = (),
    expected_tree_sha256: str,
    suffixes: Sequence[str] = (".jpg",),
    timeout: float = 60.0,
) -> Path:
    """Download a zip from the first URL that works, verify its content and extract it to ``destination``.

    Mirrors are tried in order; a network error, a broken archive or a digest mismatch moves on to the next one. The
    downloaded archive is always deleted.

    Args:
        urls: Mirrors of the same archive, preferred first.
        destination: Final folder; returned unchanged if it already exists.
        top_dirs: Accepted names of the archive's top-level folder.
        expected_tree_sha256: :func:`tree_digest` the extracted payload must have.
        suffixes: File suffixes covered by the digest.
        timeout: Socket timeout per URL, in seconds.

    Returns:
        ``destination``.

    Raises:
        DownloadError: If every URL failed; the message lists why each one did.
    """
    if destination.is_dir():
        logger.info("%s already exists; not downloading", destination)
        return destination
    if not urls:
        raise DownloadError("no download URL given")
    failures = []
    for url in urls:
        logger.info("downloading %s -> %s", url, destination)
        archive = None
        try:
            archive = download_url(url, destination.parent, timeout=timeout)
            return extract_zip_verified(
                archive, destination, top_dirs=top_dirs, expected_tree_sha256=expected_tree_sha256, suffixes=suffixes
            )
        except (urllib.error.URLError, OSError, DownloadError) as err:
            logger.warning("download from %s failed: %s", url, err)
            failures.append(f"  {url}: {err}")
        finally:
            if archive is not None:
                archive.unlink(missing_ok=True)
    raise DownloadError(f"could not obtain {destination.name} from any mirror:\n" + "\n".join(failures))
