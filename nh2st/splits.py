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

Any dataset (your own `visium` / `hest` stores included):

- `kfold:K`: KFold(K, shuffle=True, random_state=seed) over the sorted sample ids;
- `loo`: leave one sample out, one fold per sample (sorted);
- `patient`: leave one patient out (patients sorted by name); `patient:K`: K folds of whole
  patients, balanced by slide count (largest patients first, each to the fold with the fewest
  slides, ties by name then fold index). Patients come from `patients` ({sample: patient}: a CSV
  read by :func:`read_patients`, or the `patient` each reader stored, :func:`patients_from_store`).
  For the paper's datasets `patient` keeps the scheme above (their patients are known) unless
  `patients` is given explicitly (a --patients CSV); `patient:K` uses the given patients, else the
  known ones (zen, stnet, skin, int, demo).

The paper's datasets default to `paper`; datasets without paper folds need one of these.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path


from nh2st.errors import NH2STError


@dataclass(frozen=True)
class Fold:
    index: int
    train: list[str]
    test: list[str]


SPLITS = ("paper", "patient", "patient:K", "kfold:K", "loo")
DEFAULT_SEED = 42
PATIENT_COLUMNS = (("sample", "sample_id", "id", "slide"), ("patient", "patient_id", "donor", "subject"))

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
    from sklearn.model_selection import KFold  # sklearn costs ~1 s to import; `nh2st --help` should not

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


def _paper_folds(dataset: str, sample_ids: list[str] | None, split: str) -> list[list[str]]:
    """(ids, each fold's test ids) of the paper's scheme (split "paper" or "patient")."""
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
    return ids, tests


def parse_split(split: str) -> tuple[str, int | None]:
    """"kfold:4" -> ("kfold", 4); "loo" -> ("loo", None); an unknown split is an error listing SPLITS."""
    kind, sep, value = str(split).strip().lower().partition(":")
    if kind in ("paper", "loo", "patient") and not sep:
        return kind, None
    if kind in ("kfold", "patient") and sep:
        if not value.isdigit() or int(value) < 2:
            raise NH2STError(f"--split {split}: K must be a whole number of folds, at least 2 (e.g. {kind}:4)")
        return kind, int(value)
    raise NH2STError(f"--split {split!r} is unknown; choose one of: {', '.join(SPLITS)}")


def read_patients(path) -> dict[str, str]:
    """A CSV (or tab-separated) file with a header naming a sample column (sample, sample_id, id or
    slide) and a patient column (patient, patient_id, donor or subject) -> {sample id: patient}."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise NH2STError(f"--patients {path}: file not found; give a CSV with columns sample,patient")
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types on malformed files
        raise NH2STError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc}); give columns sample,patient") from None
    columns = {str(c).strip().lower(): c for c in table.columns}
    found = [next((columns[n] for n in names if n in columns), None) for names in PATIENT_COLUMNS]
    if None in found:
        raise NH2STError(f"{path}: needs a header with a sample column ({'/'.join(PATIENT_COLUMNS[0])}) and a patient "
                         f"column ({'/'.join(PATIENT_COLUMNS[1])}); found: {', '.join(map(str, table.columns))}")
    out: dict[str, str] = {}
    for line, (sample, patient) in enumerate(zip(table[found[0]], table[found[1]]), start=2):
        sample, patient = str(sample).strip(), str(patient).strip()
        if not sample or not patient:
            raise NH2STError(f"{path}: line {line} has an empty sample or patient; give both on every line")
        if out.get(sample, patient) != patient:
            raise NH2STError(f"{path}: sample {sample} is given two patients ({out[sample]}, {patient}); keep one")
        out[sample] = patient
    if not out:
        raise NH2STError(f"{path}: no rows; give one line sample,patient per sample")
    return out


def patients_from_store(store) -> dict[str, str]:
    """{sample: patient} for the complete samples of an EmbeddingStore whose reader recorded a patient."""
    out = {}
    for sample_id in store.sample_ids():
        patient = (store.sample_info(sample_id).get("meta") or {}).get("patient")
        if patient not in (None, ""):
            out[sample_id] = str(patient)
    return out


def _known_patients(dataset: str, ids: list[str]) -> dict[str, str] | None:
    if dataset == "zen":
        return {s: ZEN_PATIENTS[s] for s in ids if s in ZEN_PATIENTS}
    if dataset in ("stnet", "skin"):
        return {s: s.split("_")[0] for s in ids}
    if dataset in ("int", "demo"):
        return {s: s for s in ids if dataset == "demo" or s in INT_IDS}
    return None


def _patient_tests(ids: list[str], patients: dict[str, str], k: int | None, source: str) -> list[list[str]]:
    lacking = [s for s in ids if s not in patients]
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise NH2STError(f"{source} has no patient for sample(s) {shown}; add a line <sample>,<patient> for each "
                         "(every sample needs its patient)")
    groups: dict[str, list[str]] = {}
    for s in ids:
        groups.setdefault(patients[s], []).append(s)
    if len(groups) < 2:
        raise NH2STError(f"all {len(ids)} samples belong to one patient ({next(iter(groups))}); folds by patient "
                         "need at least 2 patients; use --split kfold:K or loo")
    names = sorted(groups)
    if k is None:
        return [groups[p] for p in names]
    if k > len(groups):
        raise NH2STError(f"--split patient:{k}: only {len(groups)} patients; use at most patient:{len(groups)}")
    tests: list[list[str]] = [[] for _ in range(k)]
    for patient in sorted(names, key=lambda p: -len(groups[p])):
        min(tests, key=len).extend(groups[patient])
    return tests


def folds(dataset: str, sample_ids: list[str] | None = None, split: str = "paper",
          patients: dict[str, str] | None = None, seed: int = DEFAULT_SEED,
          patients_source: str = "the patient list") -> list[Fold]:
    """The folds of `dataset` over `sample_ids` (default: the paper's sample list) for `split`.

    split: paper | patient | patient:K | kfold:K | loo (module docstring). patients: {sample:
    patient} for the patient splits; seed: kfold's shuffle. Train and test lists are sorted; folds
    left without train or test samples are dropped. With the paper's split, the paper's folds are
    restricted to `sample_ids`, and ids its scheme does not know are an error.
    """
    dataset = dataset.lower()
    kind, k = parse_split(split)
    if sample_ids is None and dataset not in KNOWN_SAMPLES:
        raise NH2STError(f"{dataset} has no known sample list; give its sample ids (e.g. --store or --samples)")
    if kind == "paper" and dataset not in KNOWN_SAMPLES:
        raise NH2STError(f"{dataset} has no paper folds; choose --split kfold:K, loo or patient "
                         "(with --patients CSV when the samples carry no patient)")
    if kind == "paper" or (kind == "patient" and k is None and dataset in KNOWN_SAMPLES and patients is None):
        ids, tests = _paper_folds(dataset, sample_ids, kind)
    else:
        ids = sorted(dict.fromkeys(sample_ids if sample_ids is not None else known_samples(dataset)))
        if sample_ids is not None and len(ids) != len(sample_ids):
            raise NH2STError(f"duplicate sample ids given for {dataset}; each sample must appear once")
        if kind == "kfold":
            tests = _kfold_by_sample(ids, k, seed)
        elif kind == "loo":
            tests = [[s] for s in ids]
        else:
            if patients is None:
                patients = _known_patients(dataset, ids)
                patients_source = f"the known {dataset} patients"
            if patients is None:
                raise NH2STError(f"--split {split} needs each sample's patient: pass --patients CSV (columns "
                                 "sample,patient), or extract from HEST-1k, whose metadata's patient is stored")
            tests = _patient_tests(ids, patients, k, patients_source)
    out = []
    for index, test in enumerate(tests):
        train = sorted(s for s in ids if s not in set(test))
        if test and train:
            out.append(Fold(index, train, sorted(test)))
    if not out:
        raise NH2STError(f"the {len(ids)} given {dataset} sample(s) leave no fold with both train and test "
                         "samples; add samples")
    return out


def folds_as_dict(fold_list: list[Fold]) -> dict[str, dict[str, list[str]]]:
    """JSON form of folds: {"<index>": {"train": [...], "test": [...]}, ...}."""
    return {str(f.index): {"train": list(f.train), "test": list(f.test)} for f in fold_list}
