"""Checking output folders against their provenance record, and re-running the recorded merge.

``verify_outputs`` re-hashes every file that ``provenance.json`` lists. With ``rerun`` it also
merges again into a temporary folder and compares the adapter files byte for byte. The rerun reads
the manifest file named in the record when its sha256 still matches. Otherwise it uses the
normalised manifest stored in the record, with the recorded absolute source paths. Either way the
source files are checked against their recorded sha256 before anything is merged.

``provenance.json`` contains no hash of itself. Anyone who can rewrite it can make a changed file
pass the plain check, but not ``--rerun``, because the rerun derives the adapter files again from
the sources.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorakit.errors import LorakitError, OutputError
from lorakit.execute import CONFIG_NAME, WEIGHTS_NAME, run_plan
from lorakit.manifest import Manifest, load_manifest
from lorakit.plan import Plan, build_plan, natural_key
from lorakit.provenance import PROVENANCE_NAME, file_sha256, package_versions

__all__ = ["FileCheck", "OutputCheck", "find_output_folders", "verify_outputs"]

logger = logging.getLogger(__name__)

# The files a rerun compares. The model card and provenance.json name paths and versions, so
# they may differ between two runs that wrote identical adapters.
RERUN_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass(frozen=True)
class FileCheck:
    """One file's sha256 as recorded and as found (None when the file is missing)."""

    name: str
    recorded: str | None
    found: str | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.recorded is not None and self.recorded == self.found

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.name, "ok": self.ok, "recorded": self.recorded, "found": self.found, "detail": self.detail or None}


@dataclass
class OutputCheck:
    """The result of verifying one output folder."""

    folder: Path
    record: dict[str, Any] = field(repr=False)
    files: list[FileCheck]
    extra_files: list[str]
    rerun: list[FileCheck] | None = None
    rerun_problems: list[str] = field(default_factory=list)
    rerun_manifest: str | None = None

    @property
    def seed(self) -> int | None:
        return self.record.get("seed")

    @property
    def ok(self) -> bool:
        rerun_ok = self.rerun is None or (not self.rerun_problems and all(check.ok for check in self.rerun))
        return all(check.ok for check in self.files) and rerun_ok

    def problems(self) -> list[str]:
        """Describe every failed check, one line each, naming the file."""
        lines = []
        for check in self.files:
            path = self.folder / check.name
            if check.found is None:
                lines.append(f"{path}: missing; {PROVENANCE_NAME} records it with sha256 {check.recorded}")
            elif not check.ok:
                lines.append(f"{path}: sha256 {check.found} differs from {check.recorded} in {PROVENANCE_NAME}")
        lines.extend(self.rerun_problems)
        for check in self.rerun or []:
            if not check.ok:
                lines.append(
                    f"{self.folder / check.name}: the rerun wrote different bytes (sha256 {check.found}, recorded "
                    f"{check.recorded}){'; ' + check.detail if check.detail else ''}"
                )
        return lines

    def summary(self) -> str:
        """Describe a passed check in one line."""
        text = f"{self.folder}: ok, {len(self.files)} files match {PROVENANCE_NAME}"
        if self.rerun is not None:
            text += (
                f"; the rerun reproduced {' and '.join(check.name for check in self.rerun)} byte for byte "
                f"(manifest: {self.rerun_manifest})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "folder": str(self.folder),
            "seed": self.seed,
            "ok": self.ok,
            "files": [check.to_dict() for check in self.files],
            "unrecorded_files": self.extra_files,
            "problems": self.problems(),
        }
        if self.rerun is not None:
            result["rerun"] = {
                "manifest": self.rerun_manifest,
                "files": [check.to_dict() for check in self.rerun],
                "problems": self.rerun_problems,
            }
        return result


def find_output_folders(path: Path) -> list[Path]:
    """Return ``path`` when it contains a provenance record, else its ``seed-<seed>`` folders that do.

    Raises:
        OutputError: when ``path`` does not exist.
        LorakitError: when neither ``path`` nor a seed folder in it contains a provenance record.
    """
    if not path.exists():
        raise OutputError(f"{path}: not found")
    if not path.is_dir():
        raise LorakitError(f"{path}: not a folder; pass an output folder written by `lorakit run`")
    if (path / PROVENANCE_NAME).is_file():
        return [path]
    seed_folders = [
        child for child in path.iterdir() if child.name.startswith("seed-") and (child / PROVENANCE_NAME).is_file()
    ]
    if not seed_folders:
        raise LorakitError(
            f"{path}: no {PROVENANCE_NAME} here or in seed-<seed>/ subfolders; pass an output folder written by `lorakit run`"
        )
    return sorted(seed_folders, key=lambda folder: natural_key(folder.name))


def _load_record(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise OutputError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise LorakitError(f"{path}: not UTF-8 text: {error}") from error
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise LorakitError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from error

    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("lorakit_provenance") != 1 or not isinstance(files, dict):
        raise LorakitError(f"{path}: not a lorakit provenance record (version 1 with a 'files' mapping)")
    for name, digest in files.items():
        # A name with a separator would make verify hash files outside the folder.
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(digest, str):
            raise LorakitError(f"{path}: invalid entry {name!r} in 'files'; expected a plain file name and its sha256")
    return record


def _check_files(folder: Path, record: dict[str, Any]) -> tuple[list[FileCheck], list[str]]:
    checks = []
    for name, recorded in record["files"].items():
        path = folder / name
        checks.append(FileCheck(name, recorded, file_sha256(path) if path.is_file() else None))
    # Hidden files (.gitattributes, .git from a Hub clone) are not part of the output.
    listed = set(record["files"]) | {PROVENANCE_NAME}
    extra = sorted(child.name for child in folder.iterdir() if child.name not in listed and not child.name.startswith("."))
    return checks, extra


def _rerun_manifest(record: dict[str, Any], scratch: Path) -> tuple[Manifest, str]:
    """Load the manifest a rerun uses, and describe where it came from."""
    recorded = record["manifest"]
    path = Path(recorded["path"])
    if path.is_file() and file_sha256(path) == recorded["sha256"]:
        return load_manifest(path), str(path)

    normalised = copy.deepcopy(recorded["normalised"])
    for entry, source in zip(normalised["sources"], record["sources"]):
        entry["path"] = source["path"]
    # Replaced after loading; it only has to pass the check that it lies outside the manifest's folder.
    normalised["output"]["path"] = str(scratch / "output")
    manifest_path = scratch / "manifest" / "manifest.yaml"
    manifest_path.parent.mkdir()
    manifest_path.write_text(json.dumps(normalised, indent=2) + "\n", encoding="utf-8")
    reason = "is missing" if not path.is_file() else "has changed"
    return load_manifest(manifest_path), f"normalised manifest from {PROVENANCE_NAME} because {path} {reason}"


def _check_sources(plan: Plan, record: dict[str, Any]) -> list[str]:
    """Compare every source file the plan will read with its recorded sha256."""
    recorded_sources = record["sources"]
    if len(recorded_sources) != len(plan.adapters):
        return [f"the manifest names {len(plan.adapters)} sources but {PROVENANCE_NAME} records {len(recorded_sources)}"]
    problems = []
    for adapter, recorded in zip(plan.adapters, recorded_sources):
        recorded_files = recorded.get("files", {})
        for path in adapter.files():
            expected = recorded_files.get(path.name)
            if expected is None:
                problems.append(
                    f"{path}: source {adapter.name!r} now reads this file, but {PROVENANCE_NAME} records "
                    f"{', '.join(recorded_files) or 'no files'}; the source changed since the merge"
                )
                continue
            found = file_sha256(path)
            if found != expected:
                problems.append(
                    f"{path}: sha256 {found} differs from {expected} recorded for source {adapter.name!r}; "
                    "the source changed since the merge, so the rerun cannot reproduce it"
                )
    return problems


def _first_difference(original: Path, rerun: Path) -> str:
    """Name the first tensor whose bytes differ between two safetensors files."""
    try:
        with safe_open(str(original), framework="pt") as left, safe_open(str(rerun), framework="pt") as right:
            left_keys, right_keys = set(left.keys()), set(right.keys())
            if left_keys != right_keys:
                only = sorted(left_keys ^ right_keys, key=natural_key)
                return f"the tensor names differ, first {only[0]!r}"
            for key in sorted(left_keys, key=natural_key):
                a, b = left.get_tensor(key), right.get_tensor(key)
                if a.shape != b.shape or a.dtype != b.dtype:
                    return f"tensor {key!r} is {list(a.shape)} {a.dtype} in the output, {list(b.shape)} {b.dtype} in the rerun"
                if not torch.equal(a, b):
                    difference = (a.double() - b.double()).abs().max().item()
                    return f"first differing tensor {key!r}, max |difference| {difference:.3g}"
    except Exception as error:  # a corrupt output file, already reported by its sha256 mismatch
        logger.debug("cannot compare %s with %s: %s", original, rerun, error)
        return ""
    return "every tensor is equal, so the header differs"


def _environment_notes(record: dict[str, Any], plan: Plan) -> str:
    """Name recorded versions and device that differ from this rerun's, which can change the last bits."""
    notes = []
    if str(plan.device) != record.get("device"):
        notes.append(f"the rerun ran on {plan.device}, the merge on {record.get('device')}")
    recorded_versions = record.get("versions") or {}
    for package, current in package_versions().items():
        if recorded_versions.get(package) != current:
            notes.append(f"{package} {recorded_versions.get(package)} was used, {current} is installed")
    return "; ".join(notes)


def _rerun(checks: list[OutputCheck], device: str | None) -> None:
    """Merge again the outputs of ``checks``, which share one recorded manifest, and compare the adapter files."""
    record = checks[0].record
    with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as scratch_name:
        scratch = Path(scratch_name)
        manifest, origin = _rerun_manifest(record, scratch)
        # Each module's draws depend only on (seed, module path), so merging just the seeds under
        # check writes the same bytes as the full run did.
        seeds = tuple(check.seed for check in checks if check.seed is not None)
        manifest = dataclasses.replace(manifest, output_path=scratch / "output", seeds=seeds or manifest.seeds)
        plan = build_plan(manifest, device=device or record.get("device") or "auto")

        problems = _check_sources(plan, record)
        if problems:
            for adapter in plan.adapters:
                adapter.close()
            for check in checks:
                check.rerun, check.rerun_problems, check.rerun_manifest = [], problems, origin
            return

        logger.info("rerunning the merge of %s from %s", ", ".join(str(check.folder) for check in checks), origin)
        written = {result.seed: result.path for result in run_plan(plan, progress=False)}
        notes = _environment_notes(record, plan)
        for check in checks:
            check.rerun_manifest = origin
            folder = written.get(check.seed)
            if folder is None:
                check.rerun, check.rerun_problems = [], [f"{check.folder}: the rerun wrote no output for seed {check.seed}"]
                continue
            check.rerun = []
            for name in RERUN_FILES:
                found = file_sha256(folder / name)
                recorded = check.record["files"].get(name)
                detail = ""
                if found != recorded:
                    original_ok = all(item.ok for item in check.files if item.name == name)
                    difference = _first_difference(check.folder / name, folder / name) if name == WEIGHTS_NAME and original_ok else ""
                    detail = "; ".join(part for part in (difference, notes) if part)
                check.rerun.append(FileCheck(name, recorded, found, detail))


def verify_outputs(path: Path, rerun: bool = False, device: str | None = None) -> list[OutputCheck]:
    """Verify an output folder, or every ``seed-<seed>`` folder under ``path``.

    Args:
        path: an output folder, or the parent of the seed folders of a multi-seed merge.
        rerun: also merge again from the recorded manifest and sources and compare the bytes of
            adapter_config.json and adapter_model.safetensors.
        device: the device for the rerun; default the recorded one.

    Raises:
        LorakitError: for a folder without a readable provenance record, or a rerun whose manifest
            or sources cannot be loaded.
    """
    checks = []
    for folder in find_output_folders(path):
        record = _load_record(folder)
        files, extra = _check_files(folder, record)
        checks.append(OutputCheck(folder=folder, record=record, files=files, extra_files=extra))

    if rerun:
        by_manifest: dict[str, list[OutputCheck]] = {}
        for check in checks:
            manifest = check.record.get("manifest")
            if not isinstance(manifest, dict) or "normalised" not in manifest or "sources" not in check.record:
                raise LorakitError(f"{check.folder / PROVENANCE_NAME}: has no recorded manifest and sources to rerun")
            key = json.dumps([manifest.get("sha256"), manifest["normalised"], check.record["sources"]], sort_keys=True)
            by_manifest.setdefault(key, []).append(check)
        for group in by_manifest.values():
            _rerun(group, device)
    return checks
