"""The institutions' data of a simulation: a folder of files, or one file split into institutions.

* A folder: one data file per institution (``<institution>.jsonl``, ``.json``, ``.parquet`` or
  ``.csv``; the name is the stem); eval sets from ``test/<institution>.<ext>`` when that folder
  exists.
* One file: split into institutions by :mod:`clients.partition` (``iid``, by a ``field`` or
  ``dirichlet``-skewed over a field), with a seed.

Without explicit eval sets, each institution's own held-out set is the last
:data:`HOLDOUT_SHARE` of its records (at least one; after the seeded shuffle of a split file),
never trained on. Every institution is then scored on its own held-out set, besides the pooled
one (their union).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from clients.data import FORMATS, Example, Record, load_records
from clients.errors import EmptyDatasetError
from clients.partition import PartitionSpec, partition

#: Share of each institution's records held out as its eval set when there is no test/ folder.
HOLDOUT_SHARE = 0.1
TEST_SUBDIR = "test"


class DataLayoutError(EmptyDatasetError):
    """Data that cannot be arranged into institutions (too few files, no split asked for...)."""


@dataclass(frozen=True)
class InstitutionData:
    train: dict[str, list[Example]]
    test: dict[str, list[Example]]  # each institution's own held-out set
    description: str


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)


def _holdout(train: dict[str, list[Example]], where: str) -> dict[str, list[Example]]:
    test: dict[str, list[Example]] = {}
    for name, examples in train.items():
        if len(examples) < 2:
            raise DataLayoutError(
                f"{where}: institution {name} has one record, which cannot be split into "
                f"training and eval data; add records or a {TEST_SUBDIR}/ folder"
            )
        held = max(1, round(HOLDOUT_SHARE * len(examples)))
        train[name], test[name] = examples[:-held], examples[-held:]
    return test


def load_data(path: Path, split: PartitionSpec | None = None) -> InstitutionData:
    """Institutions' training data and their own held-out sets from ``path`` (see module doc)."""
    if path.is_dir():
        if split is not None:
            raise DataLayoutError(
                f"--data {path} is a folder of per-institution files; a partition applies to "
                "one data file"
            )
        files = data_files(path)
        if len(files) < 2:
            raise DataLayoutError(
                f"--data {path}: need one data file per institution "
                f"({', '.join(FORMATS)}), found {len(files)}"
            )
        stems = [f.stem for f in files]
        if len(set(stems)) != len(stems):
            raise DataLayoutError(f"--data {path}: two files name the same institution")
        train = {f.stem: [r.example for r in load_records(f)] for f in files}
        test_dir = path / TEST_SUBDIR
        if test_dir.is_dir() and data_files(test_dir):
            test = {f.stem: [r.example for r in load_records(f)] for f in data_files(test_dir)}
            unknown = sorted(set(test) - set(train))
            if unknown:
                raise DataLayoutError(
                    f"--data {test_dir}: eval sets of unknown institutions: {', '.join(unknown)}"
                )
            return InstitutionData(train, test, f"{path} ({len(files)} files, {TEST_SUBDIR}/)")
        test = _holdout(train, f"--data {path}")
        return InstitutionData(train, test, f"{path} ({len(files)} files, last 10% held out)")
    if not path.is_file():
        raise DataLayoutError(f"--data {path}: no such file or folder")
    if split is None:
        raise DataLayoutError(
            f"--data {path} is one file: say how to split it into institutions with "
            "--partition iid|field|dirichlet"
        )
    records: list[Record] = load_records(path)
    labels = [r.fields.get(split.field) if split.field else "" for r in records]
    parts = partition(labels, split)
    train = {name: [records[i].example for i in rows] for name, rows in parts.items()}
    for name, examples in train.items():
        # An institution's records are in file order; shuffle them (seeded) so that its
        # held-out tail is not, say, the file's last few topics.
        random.Random(f"{split.seed}:{name}").shuffle(examples)
    test = _holdout(train, f"--data {path}")
    how = f"{split.scheme}" + (f" by {split.field}" if split.field else "")
    if split.scheme == "dirichlet":
        how += f", alpha {split.alpha:g}"
    return InstitutionData(train, test, f"{path} split {how}, seed {split.seed}")
