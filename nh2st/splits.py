"""The paper's cross-validation folds, per dataset, by exact sample id.

Folds are computed the way the released code computes them (scikit-learn KFold with the paper's
seeds over the paper's orderings) so fold k holds the same slides as in the paper:

- stnet: KFold(8, shuffle, 2021) over the code's fixed order of the 23 patients; a fold tests
  every section of its held-out patients.
- skin:  leave one patient out, patients P2, P5, P9, P10 in that order.
- pcw:   leave one developmental stage out: 4.5-5PCW, 6.5PCW, 9PCW.
- mouse: KFold(4, shuffle, 42) over the slide names sorted *with* their `_coord.csv` suffix (the
  code sorts file names, so Rep10, Rep11, Rep12 come before Rep1). That quirk is reproduced so fold
  k holds the paper's slides; sorting the bare names would give other folds.
- int:   KFold(8, shuffle, 42) over INT1-INT24 (or over HEST's 29 INT ids when any of INT25-28 or
  INT35 is among the given samples: the code takes every file with "INT" in its name).
- zen:   KFold(3, shuffle, 42) over ZEN40-ZEN49.

Sample subsets. Given `sample_ids` (e.g. what is on disk or in a store), every fold keeps the
paper's membership restricted to those samples: for the grouped schemes (stnet, skin, pcw) the
fold is defined by patient or stage; for the KFold-over-samples schemes (mouse, int, zen) the
paper's KFold runs over the paper's full list and is then restricted. So a missing slide never
moves another slide to a different fold. Folds left without test or train samples are dropped
(the others keep their paper index); `missing_samples` names what is absent.

`split="patient"`: ZEN's and Mouse's paper folds split by slide, so replicates of one patient
sit in both train and test (their paper split warns about that). ZEN has patient labels (HEST):
its 7 patients go to 3 folds balanced by slide count (4/3/3 slides, each patient's slides
together). Mouse replicates carry no animal id, so it has no patient split (an error). For stnet, skin,
pcw and int the paper folds already hold out whole patients (or stages), so both names give the
same folds.
"""

import warnings
from dataclasses import dataclass

from sklearn.model_selection import KFold

from nh2st.errors import NH2STError


@dataclass(frozen=True)
class Fold:
    index: int
    train: list[str]
    test: list[str]


SPLITS = ("paper", "patient")

DEMO_IDS = [f"DEMO{i}" for i in range(1, 7)]

ZEN_IDS = [f"ZEN{i}" for i in range(40, 50)]
# HEST `patient` labels of ZEN40-ZEN49 (datasets.md §5.4).
ZEN_PATIENTS = {"ZEN40": "Patient 7", "ZEN41": "Patient 6", "ZEN42": "Patient 5", "ZEN43": "Patient 4",
                "ZEN44": "Patient 3", "ZEN45": "Patient 3", "ZEN46": "Patient 2", "ZEN47": "Patient 2",
                "ZEN48": "Patient 1", "ZEN49": "Patient 1"}

INT_IDS = [f"INT{i}" for i in range(1, 25)]            # ccRCC, one slide per patient
INT_HEST_IDS = INT_IDS + [f"INT{i}" for i in (25, 26, 27, 28, 35)]   # + prostate, no patient label

# The patient order as written in the paper's code (not sorted), and each patient's sections.
STNET_PATIENTS = ["BC23209", "BC23270", "BC23803", "BC24105", "BC24220", "BC23268", "BC23269",
                  "BC23272", "BC23277", "BC23287", "BC23288", "BC23377", "BC23450", "BC23506",
                  "BC23508", "BC23567", "BC23810", "BC23895", "BC23901", "BC23903", "BC23944",
                  "BC24044", "BC24223"]
_STNET_SECTIONS = {
    "C1 C2 D1": ["BC23209", "BC23268", "BC23269", "BC23287", "BC23377", "BC23506", "BC23895",
                 "BC23903", "BC24105"],
    "D2 E1 E2": ["BC23270", "BC23272", "BC23277", "BC23288", "BC23450", "BC23508", "BC23567",
                 "BC23803", "BC23810", "BC23944", "BC24044", "BC24220", "BC24223"],
    "C2 D1": ["BC23901"],
}
STNET_IDS = sorted(f"{patient}_{section}" for sections, patients in _STNET_SECTIONS.items()
                   for patient in patients for section in sections.split())

SKIN_PATIENTS = ["P2", "P5", "P9", "P10"]
SKIN_IDS = [f"{p}_ST_rep{r}" for p in SKIN_PATIENTS for r in (1, 2, 3)]

PCW_STAGES = ["4.5-5PCW", "6.5PCW", "9PCW"]
_PCW_PREFIX = "Human_Heart_Asp_12122019_ST_ST_Sample_"
PCW_IDS = [f"{_PCW_PREFIX}{stage}_{n}" for stage, count in zip(PCW_STAGES, (4, 9, 6))
           for n in range(1, count + 1)]

MOUSE_IDS = [f"Mouse_OlfactoryBulb_Stahl_07012016_ST_Rep{i}" for i in range(1, 13)]

KNOWN_SAMPLES: dict[str, list[str]] = {
    "demo": DEMO_IDS,
    "stnet": STNET_IDS,
    "skin": SKIN_IDS,
    "pcw": PCW_IDS,
    "mouse": MOUSE_IDS,
    "int": INT_IDS,
    "zen": ZEN_IDS,
}

_LEAK_WARNINGS = {
    "zen": "zen paper folds split by slide, not by patient: the replicate slides of patients 1-3 sit in "
           "both train and test, which inflates scores; --split patient holds out whole patients",
    "mouse": "mouse paper folds split by slide: the replicates carry no animal id, so sections of one "
             "animal may sit in both train and test, which can inflate scores",
}


def known_samples(dataset: str) -> list[str]:
    """The paper's sample ids of `dataset` (sorted as strings), no data needed."""
    dataset = dataset.lower()
    if dataset not in KNOWN_SAMPLES:
        raise NH2STError(f"no known sample list for dataset {dataset!r}; known: {', '.join(KNOWN_SAMPLES)}")
    return list(KNOWN_SAMPLES[dataset])


def _universe(dataset: str, sample_ids: list[str] | None) -> list[str]:
    """The full sample list the folds are defined over (INT: 24 or 29 ids, see module doc)."""
    if dataset == "int" and sample_ids is not None and not set(sample_ids) <= set(INT_IDS):
        return list(INT_HEST_IDS)
    return known_samples(dataset)


def missing_samples(dataset: str, sample_ids: list[str]) -> list[str]:
    """The paper's samples of `dataset` that are not among `sample_ids` (exact ids)."""
    dataset = dataset.lower()
    present = set(sample_ids)
    return [s for s in _universe(dataset, list(sample_ids)) if s not in present]


def _kfold_by_sample(ordered: list[str], n_splits: int, seed: int) -> list[list[str]]:
    """Test ids of KFold(n_splits, shuffle=True, random_state=seed) over `ordered` as given."""
    if len(ordered) < n_splits:
        raise NH2STError(f"{len(ordered)} samples cannot make {n_splits} folds; add samples or use fewer folds")
    splitter = KFold(n_splits, shuffle=True, random_state=seed)
    return [[ordered[i] for i in test] for _, test in splitter.split(ordered)]


def _kfold_by_group(groups: list[str], n_splits: int, seed: int, group_of, ids: list[str]) -> list[list[str]]:
    """KFold over `groups` in the given order; a fold tests every id whose group is held out."""
    held_out = _kfold_by_sample(groups, n_splits, seed)
    return [[s for s in ids if group_of(s) in set(fold)] for fold in held_out]


def _stnet_patient(sample_id: str) -> str:
    return sample_id.split("_")[0]


def _pcw_stage(sample_id: str) -> str:
    return sample_id.removeprefix(_PCW_PREFIX).rsplit("_", 1)[0]


def _zen_patient_folds(ids: list[str]) -> list[list[str]]:
    """7 ZEN patients -> 3 folds balanced by number of slides (largest patients first, then
    patient number; each goes to the fold with the fewest slides, lowest index on ties)."""
    patients: dict[str, list[str]] = {}
    for s in ids:
        patients.setdefault(ZEN_PATIENTS[s], []).append(s)
    order = sorted(patients, key=lambda p: (-len(patients[p]), int(p.split()[-1])))
    tests: list[list[str]] = [[], [], []]
    for patient in order:
        min(tests, key=len).extend(patients[patient])
    return tests


def _paper_tests(dataset: str, universe: list[str], split: str) -> list[list[str]]:
    """Each fold's test ids over the full `universe` of the dataset."""
    if dataset == "stnet":
        return _kfold_by_group(STNET_PATIENTS, 8, 2021, _stnet_patient, universe)
    if dataset == "skin":
        return [[s for s in universe if s.split("_")[0] == p] for p in SKIN_PATIENTS]
    if dataset == "pcw":
        return [[s for s in universe if _pcw_stage(s) == stage] for stage in PCW_STAGES]
    if dataset == "mouse":
        if split == "patient":
            raise NH2STError("--split patient is not possible for mouse: the replicates carry no animal id; "
                             "use --split paper (it splits by slide)")
        warnings.warn(_LEAK_WARNINGS["mouse"], stacklevel=3)
        by_file_name = sorted(universe, key=lambda s: s + "_coord.csv")
        return _kfold_by_sample(by_file_name, 4, 42)
    if dataset == "zen":
        if split == "patient":
            return _zen_patient_folds(universe)
        warnings.warn(_LEAK_WARNINGS["zen"], stacklevel=3)
        return _kfold_by_sample(sorted(universe, key=lambda s: s + ".h5ad"), 3, 42)
    if dataset == "int":
        if split == "patient" and not set(universe) <= set(INT_IDS):
            raise NH2STError("--split patient for int needs INT1-INT24 only (one patient each); INT25-28 and "
                             "INT35 have no patient label: drop them or use --split paper")
        return _kfold_by_sample(sorted(universe, key=lambda s: s + ".h5ad"), 8, 42)
    raise NH2STError(f"no fold scheme for dataset {dataset!r}")


def folds(dataset: str, sample_ids: list[str] | None = None, split: str = "paper") -> list[Fold]:
    """The folds of `dataset` over `sample_ids` (default: the paper's sample list).

    Train and test lists are sorted. With `sample_ids`, the paper's folds are restricted to those
    ids (see the module docstring); ids the dataset's fold scheme does not know are an error.
    """
    dataset = dataset.lower()
    if split not in SPLITS:
        raise NH2STError(f"--split {split!r} is unknown; choose one of: {', '.join(SPLITS)}")
    if dataset == "demo":  # synthetic: any ids, one slide per patient
        ids = list(sample_ids) if sample_ids is not None else known_samples("demo")
        tests = _kfold_by_sample(sorted(ids), 3, 42)
    else:
        universe = _universe(dataset, None if sample_ids is None else list(sample_ids))
        ids = universe if sample_ids is None else list(sample_ids)
        unknown = sorted(set(ids) - set(universe))
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise NH2STError(f"sample(s) {shown} are not among the paper's {dataset} samples, so they belong to "
                             f"no fold; remove them or pick the dataset they come from")
        if len(set(ids)) != len(ids):
            raise NH2STError(f"duplicate sample ids given for {dataset}; each sample must appear once")
        present = set(ids)
        tests = [[s for s in test if s in present] for test in _paper_tests(dataset, universe, split)]
    out = []
    for k, test in enumerate(tests):
        train = sorted(s for s in ids if s not in set(test))
        if test and train:
            out.append(Fold(k, train, sorted(test)))
    if not out:
        raise NH2STError(f"the {len(ids)} given {dataset} sample(s) leave no fold with both train and test "
                         "samples; add samples")
    return out


def folds_as_dict(fold_list: list[Fold]) -> dict[str, dict[str, list[str]]]:
    """JSON form of folds: {"<index>": {"train": [...], "test": [...]}, ...}."""
    return {str(f.index): {"train": list(f.train), "test": list(f.test)} for f in fold_list}
