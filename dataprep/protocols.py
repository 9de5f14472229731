"""Benchmark protocols as data: ``dataprep/manifests/protocol*.json`` (package data, so an installed
wheel has them; ``manifests/`` at the project's root links there) read here, splits assigned here."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import SampleRef
from .shards import NAME_CHARS

#: A usable split name: it becomes the start of shard file names (``<split>-NNNNNN.tar``).
SPLIT_NAME = re.compile(f"[{NAME_CHARS}]+")
#: The sample field a split by names matches (``"by"`` of a manifest's or a --split-file's splits).
SPLIT_BY = ("group", "source", "key")
MANIFESTS_DIR = Path(os.environ.get("DATAPREP_MANIFESTS", Path(__file__).resolve().parent / "manifests"))
#: Where a broken or missing manifest comes back from.
RESTORE = "restore it from the project (dataprep/manifests/) or reinstall headpose-dataprep"


@dataclass(frozen=True)
class DatasetProtocol:
    protocol: str
    dataset: str
    splits: dict  # {"train": "all"} or {"by": "group", "train": [...], "test": [...]}
    angle_limit: float | None
    detector: str
    biwi_tracking: str | None
    expected: dict
    same_person: tuple = ()


def _manifest_paths() -> list[Path]:
    """The protocol manifests' files; ValueError when there are none (an install without its
    package data, or a wrong ``DATAPREP_MANIFESTS``): no protocol would be there to choose."""
    paths = sorted(MANIFESTS_DIR.glob("*.json"))
    if not paths:
        where = "DATAPREP_MANIFESTS" if "DATAPREP_MANIFESTS" in os.environ else "the installed package"
        raise ValueError(f"no protocol manifests in {MANIFESTS_DIR} ({where}); {RESTORE}")
    return paths


def available() -> list[str]:
    return sorted(p.stem.removeprefix("protocol") for p in _manifest_paths())


def read_manifest(path: Path) -> dict:
    """A protocol manifest's contents; ValueError naming the file when it is not one (the one
    reader of the manifests, for builds and ``dataprep protocols``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable protocol manifest ({err}); {RESTORE}, or fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict) or "name" not in data:
        raise ValueError(f"{path}: not a protocol manifest (it needs \"name\" and \"datasets\"); {RESTORE}, "
                         "or fix the file")
    limit = data.get("angle_limit")
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                                  and 0 < limit < math.inf):
        # a string here made every sample an unexpected_error ("please report")
        raise ValueError(f"{path}: \"angle_limit\" is the filter's bound in degrees (99) or null, not {limit!r}; "
                         f"{RESTORE}, or fix it")
    for dataset, entry in data["datasets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("splits"), dict):
            raise ValueError(f"{path}: dataset {dataset!r} needs an object with \"splits\"; {RESTORE}, or fix it")
        problem = _splits_problem(entry["splits"])
        if problem:
            raise ValueError(f"{path}: dataset {dataset!r}: {problem}; {RESTORE}, or fix it")
    return data


def _split_names_problem(names) -> str | None:
    """Split names that cannot start shard file names (nothing that leaves --out or makes a
    folder), said in a phrase; None when all can. Manifests and --split-file alike."""
    bad = [k for k in names if not SPLIT_NAME.fullmatch(k)]
    if bad:
        return (f"split names {', '.join(map(repr, bad))} are not usable in shard file names; use letters, digits, "
                "'_' and '-' only (e.g. train, test, val_2)")
    return None


def _split_by_problem(by) -> str | None:
    """A ``"by"`` that names no sample field, said in a phrase; None for one of :data:`SPLIT_BY`."""
    return None if by in SPLIT_BY else f"\"by\" must be {', '.join(SPLIT_BY)}, not {by!r}"


def _splits_problem(splits: dict) -> str | None:
    """What makes a manifest's ``splits`` unusable (a split "all" beside another, a string for a
    list of names: a traceback, or a split matching nothing), or None."""
    names = [k for k in splits if k != "by"]
    problem = _split_names_problem(names)
    if problem:
        return problem
    if "by" not in splits:
        if len(names) != 1 or splits[names[0]] != "all":
            return ('"splits" is one split of every sample ({"test": "all"}) or "by" (group, source or key) with '
                    f"a list of names per split, not {splits}")
        return None
    problem = _split_by_problem(splits["by"])
    if problem:
        return problem
    if not names or not all(isinstance(splits[k], list) and all(isinstance(m, str) for m in splits[k]) for k in names):
        return f"each split needs a list of names (strings), not {splits}"
    return None


def manifests() -> list[dict]:
    """Every protocol manifest, in file name order."""
    return [read_manifest(p) for p in _manifest_paths()]


def load(protocol: str, dataset: str) -> DatasetProtocol:
    name = protocol if protocol == "none" else f"protocol{protocol}"
    path = MANIFESTS_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(available())} "
                         "(`dataprep protocols` lists them)")
    data = read_manifest(path)
    entry = data["datasets"].get(dataset)
    if entry is None:
        raise ValueError(
            f"protocol {protocol} has no {dataset} split (it covers {', '.join(data['datasets'])}); "
            "use --protocol none to shard every sample into one split"
        )
    return DatasetProtocol(
        protocol=data["name"],
        dataset=dataset,
        splits=entry["splits"],
        angle_limit=data.get("angle_limit"),
        detector=entry.get("detector", "gt"),
        biwi_tracking=entry.get("biwi_tracking"),
        expected=entry.get("expected", {}),
        same_person=tuple(tuple(p) for p in entry.get("same_person") or _same_person_of(dataset)),
    )


def _same_person_of(dataset: str) -> list:
    """The dataset's groups that show one person, as any protocol manifest lists them (BIWI's are
    in protocol 2's entry; a build under protocol 1 with a ``--split-file`` needs them too)."""
    for data in manifests():
        listed = data["datasets"].get(dataset, {}).get("same_person")
        if listed:
            return listed
    return []


def person_leaks(split_groups: dict[str, list[str]], same_person) -> list[dict]:
    """The people a build shows on both sides of its splits: ``{"groups": [...], "splits": [...]}``
    for each person (a group, or the groups ``same_person`` lists together) with samples in more
    than one split, so a model is tested on a face it trained on. Only for datasets whose groups
    are people (``same_person`` given: BIWI's sequences); 300W-LP's groups are photo collections.
    A protocol's own split has none; a ``--split-file`` (by group, or by key within a sequence) can."""
    if not same_person:
        return []
    splits_of: dict[str, set] = {}
    for split, groups in split_groups.items():
        for g in groups:
            splits_of.setdefault(g, set()).add(split)
    leaks = []
    for person in person_groups(list(splits_of), same_person):
        splits = sorted(set().union(*(splits_of[g] for g in person)))
        if len(splits) > 1:
            leaks.append({"groups": person, "splits": splits})
    return leaks


def leak_line(leaks: list[dict]) -> str:
    """One warning line for :func:`person_leaks`' findings."""
    def who(groups: list[str]) -> str:
        return f"sequences {' and '.join(groups)}" if len(groups) > 1 else f"sequence {groups[0]}"

    shown = "; ".join(f"{who(x['groups'])} in {' and '.join(x['splits'])}" for x in leaks)
    return (f"warning: {len(leaks)} person(s) in more than one split ({shown}): a model is tested on faces it "
            "trained on. Put each person's sequences in one split (person_leaks in manifest.json)")


def person_groups(groups: list[str], same_person) -> list[list[str]]:
    """Group names clustered by person (BIWI: sequences showing the same person go together)."""
    clusters, seen = [], set()
    pairs = {g: pair for pair in same_person for g in pair}
    for g in sorted(groups):
        if g in seen:
            continue
        cluster = sorted(x for x in pairs.get(g, (g,)) if x in groups) or [g]
        seen.update(cluster)
        clusters.append(cluster)
    return clusters


def random_group_split(groups: list[str], same_person, seed: int, test_count: int) -> dict[str, list[str]]:
    """FSA-Net-style random split by sequence, but seeded and keeping each person on one side."""
    rng = np.random.default_rng(seed)
    clusters = person_groups(groups, same_person)
    order = rng.permutation(len(clusters))
    test: list[str] = []
    for i in order:
        if len(test) + len(clusters[i]) <= test_count:
            test.extend(clusters[i])
    train = [g for g in groups if g not in test]
    return {"train": sorted(train), "test": sorted(test)}


def assign_splits(
    proto: DatasetProtocol,
    refs: list[SampleRef],
    *,
    split_seed: int | None = None,
    split_file: str | Path | None = None,
) -> dict[str, list[SampleRef]]:
    """Split name -> refs in listing order. Refs in no split are left out (not read)."""
    spec = dict(proto.splits)
    if split_file is not None:
        try:
            spec = json.loads(Path(split_file).read_text())
        except FileNotFoundError:
            raise ValueError(f"--split-file {split_file} not found; give a JSON file such as "
                             '{"by": "group", "train": [...], "test": [...]}') from None
        except ValueError as err:
            raise ValueError(f"--split-file {split_file} is not valid JSON ({err}); expected "
                             '{"by": "group", "train": [...], "test": [...]}') from None
        if not isinstance(spec, dict) or not all(isinstance(v, list) and all(isinstance(m, str) for m in v)
                                                 for k, v in spec.items() if k != "by"):
            raise ValueError(f'--split-file {split_file}: expected {{"by": "group", "train": [...], "test": [...]}}, '
                             "each split a list of names (strings)")
        spec.setdefault("by", "group")
        problem = _split_names_problem(k for k in spec if k != "by") or _split_by_problem(spec["by"])
        if problem:
            raise ValueError(f"--split-file {split_file}: {problem}")
    elif split_seed is not None:
        if spec.get("by") != "group":
            raise ValueError(f"--split-seed needs a protocol split by group; protocol {proto.protocol} splits "
                             f"{proto.dataset} as {spec}: use it with --dataset biwi --protocol 2, or give your own "
                             "split with --split-file")
        groups = sorted({r.group for r in refs})
        # the protocol's share of test sequences (8 of 24), of the sequences under --root: its fixed
        # count would put every sequence of a partial download in test, none in train
        listed = sum(len(members) for split, members in spec.items() if split != "by") or 1
        test_count = round(len(groups) * len(spec.get("test", [])) / listed)
        spec = {"by": "group", **random_group_split(groups, proto.same_person, split_seed, test_count)}

    by = spec.pop("by", None)
    out: dict[str, list[SampleRef]] = {}
    if by is None:  # {"split": "all"}
        (split, _), = spec.items()
        out[split] = list(refs)
        return out
    field = {"group": "group", "source": "source", "key": "key"}[by]
    lookup = {}
    for split, members in spec.items():
        for m in members:
            if m in lookup:
                where = f"--split-file {split_file}: " if split_file is not None else ""
                raise ValueError(f"{where}{m!r} is in both {lookup[m]!r} and {split!r}; keep it in one split")
            lookup[m] = split
        out[split] = []
    for r in refs:
        split = lookup.get(getattr(r, field))
        if split is not None:
            out[split].append(r)
    if split_file is not None:  # a name that matches nothing is a typo that would drop its samples silently
        present = {getattr(r, field) for r in refs}
        unknown = [m for m in lookup if m not in present]
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            examples = ", ".join(map(repr, sorted(present)[:3]))
            raise ValueError(f"--split-file {split_file}: no {proto.dataset} sample under --root has {by} {shown} "
                             f"(they look like {examples}); fix or remove these names")
    return out
