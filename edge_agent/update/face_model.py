"""Face-model releases: signed model files and a decision threshold, staged in the data dir,
self-tested on the golden images the release carries, then switched in by a restart with a trial
and a health gate like a config release (the previous model is kept for rollback).

    <data_dir>/models/<version>-<sha8>/   the files of one release (staged, then renamed in place)
    <data_dir>/models/active.json         the committed model: loaded by the face service at start
    <data_dir>/models/trial.json          loaded instead while a face-model release is on trial
    <data_dir>/models/previous.json       the model active before the last commit

A release's files sit flat beside each other (models/<counter>/<name>): the two dlib model files,
`golden.json` and the golden images it names. golden.json:

    {"pairs": [{"enrol": "golden-a.jpg", "probe": "golden-a2.jpg", "match": true},
               {"enrol": "golden-a.jpg", "probe": "golden-b.jpg", "match": false}]}

The self-test passes when every pair decides as it says at the release's threshold.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent import launcher
from edge_agent.face.models import RESNET_FILE, SHAPE_5_FILE, ModelFiles, sha256_file

MODELS = "models"
ACTIVE = "active.json"
TRIAL = "trial.json"
PREVIOUS = "previous.json"
GOLDEN = "golden.json"
MAX_GOLDEN_PAIRS = 32
NOT_INSTALLED = "face matching is not installed on this terminal"


class SelfTestFailed(Exception):
    """The new model did not pass its self-test (str(err) says why, in plain language)."""


@dataclass(frozen=True)
class ActiveModel:
    """One installed face model: where its files are, their signed hashes, its threshold."""

    version: str
    directory: Path
    threshold: float
    sha256: dict[str, str]  # file name -> signed sha256

    def doc(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "directory": self.directory.name,
            "threshold_milli": round(self.threshold * 1000),
            "sha256": dict(self.sha256),
        }


def models_root(data_dir: Path) -> Path:
    return Path(data_dir) / MODELS


def stage(data_dir: Path, name: str, version: str, threshold_milli: int, files: list[dict[str, str]]) -> ActiveModel:
    """Copy the verified downloads into models/<name>/ (built aside, renamed in place)."""
    root = models_root(data_dir)
    dest = root / name
    sums = {Path(f["file"]).name: f["sha256"] for f in files}
    model = ActiveModel(version, dest, threshold_milli / 1000, sums)
    if dest.is_dir() and _intact(model):
        return model
    tmp = root / f".{name}.staging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        src = Path(f["file"])
        shutil.copyfile(src, tmp / src.name)
        with open(tmp / src.name, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    launcher.fsync_dir(root)
    return model


def _intact(model: ActiveModel) -> bool:
    return all(
        (model.directory / n).is_file() and sha256_file(model.directory / n) == s for n, s in model.sha256.items()
    )


def model_files(model: ActiveModel) -> ModelFiles:
    """The model's dlib files, checked against the hashes signed in its release."""
    from edge_agent.face.errors import ModelIntegrityError

    for name in (RESNET_FILE, SHAPE_5_FILE):
        if name not in model.sha256:
            raise ModelIntegrityError(f"face model {model.version} has no {name}", path=str(model.directory))
    for name, expected in model.sha256.items():
        path = model.directory / name
        if not path.is_file():
            raise ModelIntegrityError(f"model file {name} is missing", path=str(path))
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(f"model file {name} has SHA-256 {actual}, signed {expected}", path=str(path))
    return ModelFiles(resnet=model.directory / RESNET_FILE, shape_5=model.directory / SHAPE_5_FILE)


def self_test(model: ActiveModel) -> str:
    """Load the model with the face engine and run its golden pairs; raises SelfTestFailed."""
    golden = model.directory / GOLDEN
    if GOLDEN not in model.sha256 or not golden.is_file():
        raise SelfTestFailed(f"the release carries no {GOLDEN} (its golden images and expected results)")
    try:
        doc = json.loads(golden.read_text("utf-8"))
        pairs = doc["pairs"]
        if not isinstance(pairs, list) or not pairs or len(pairs) > MAX_GOLDEN_PAIRS:
            raise ValueError(f"'pairs' must be a list of 1 to {MAX_GOLDEN_PAIRS} pairs")
        checks = [(str(p["enrol"]), str(p["probe"]), bool(p["match"])) for p in pairs]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SelfTestFailed(f"{GOLDEN} is not a golden set: {err}") from err
    if not any(m for _, _, m in checks) or all(m for _, _, m in checks):
        raise SelfTestFailed(f"{GOLDEN} needs pairs that must match and pairs that must not")
    for enrol, other, _ in checks:
        for name in (enrol, other):
            if name not in model.sha256 or "/" in name:
                raise SelfTestFailed(f"{GOLDEN} names {name!r}, which is not a file of this release")
    try:
        from edge_agent.face.decode import ImageLimits, decode_image
        from edge_agent.face.engine import FaceEngine
        from edge_agent.face.errors import FaceError
        from edge_agent.face.matching import distance, is_match
        from edge_agent.face.quality import QualityLimits
    except ImportError as err:
        raise SelfTestFailed(f"{NOT_INSTALLED} (missing {err.name})") from err
    try:
        engine = FaceEngine(model_files(model))
    except (FaceError, RuntimeError) as err:
        raise SelfTestFailed(f"the model files could not be loaded: {err}") from err
    limits = QualityLimits(check_size=False, min_sharpness=0.0, min_brightness=0.0, max_brightness=255.0)
    image_limits = ImageLimits(8 * 1024 * 1024, 16_000_000, 8192)
    vectors: dict[str, Any] = {}
    for name in sorted({n for e, p, _ in checks for n in (e, p)}):
        try:
            rgb = decode_image((model.directory / name).read_bytes(), image_limits)
        except (FaceError, OSError) as err:
            raise SelfTestFailed(f"golden image {name} could not be read: {err}") from err
        found = engine.analyse(rgb, limits, 640)
        if found.vector is None:
            raise SelfTestFailed(f"golden image {name}: no usable face ({found.reason.value})")
        vectors[name] = found.vector
    wrong = []
    for enrol, probe_name, expected in checks:
        d = distance(vectors[enrol], vectors[probe_name])
        if is_match(d, model.threshold) != expected:
            want = "match" if expected else "not match"
            wrong.append(f"{enrol}/{probe_name} should {want} (distance {d:.3f}, threshold {model.threshold:.3f})")
    if wrong:
        raise SelfTestFailed(f"{len(wrong)} of {len(checks)} golden pairs decided wrongly: " + "; ".join(wrong[:4]))
    return f"{len(checks)} golden pairs passed at threshold {model.threshold:.3f}"


def write_trial(data_dir: Path, model: ActiveModel) -> None:
    root = models_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    launcher.write_json_atomic(root / TRIAL, model.doc())


def commit_trial(data_dir: Path) -> None:
    """The trial model becomes the active one; the active one before it is kept as previous."""
    root = models_root(data_dir)
    trial = root / TRIAL
    if not trial.exists():
        return
    if (root / ACTIVE).exists():
        (root / ACTIVE).replace(root / PREVIOUS)
    trial.replace(root / ACTIVE)
    launcher.fsync_dir(root)


def drop_trial(data_dir: Path) -> None:
    (models_root(data_dir) / TRIAL).unlink(missing_ok=True)


def prune(data_dir: Path) -> None:
    """Remove model directories no pointer names (after a commit)."""
    root = models_root(data_dir)
    keep = {d.directory.name for d in (_read(root / n) for n in (ACTIVE, TRIAL, PREVIOUS)) if d is not None}
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and path.name not in keep and not path.name.startswith("."):
            shutil.rmtree(path, ignore_errors=True)


def _read(path: Path) -> ActiveModel | None:
    doc = launcher.read_json(path, None)
    if not isinstance(doc, dict):
        return None
    try:
        name = str(doc["directory"])
        if "/" in name or name.startswith("."):
            return None
        sums = {str(k): str(v) for k, v in dict(doc["sha256"]).items()}
        return ActiveModel(str(doc["version"]), path.parent / name, int(doc["threshold_milli"]) / 1000, sums)
    except (KeyError, TypeError, ValueError):
        return None


def load(data_dir: Path, on_trial: bool) -> ActiveModel | None:
    """The model the face service loads at start (the trial one while on trial), or None for the
    packaged model."""
    root = models_root(data_dir)
    for name in ([TRIAL] if on_trial else []) + [ACTIVE]:
        model = _read(root / name)
        if model is not None:
            return model
    return None
