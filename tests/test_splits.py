"""The paper's folds for every dataset, pinned to the tables in reference/datasets.md (§2.3-§5.4)."""

import json
import warnings

import pytest
from typer.testing import CliRunner

from cli.main import app
from nh2st.errors import NH2STError
from nh2st.splits import (INT_HEST_IDS, KNOWN_SAMPLES, folds, folds_as_dict, known_samples,
                          missing_samples)

PCW = "Human_Heart_Asp_12122019_ST_ST_Sample_"
MOUSE = "Mouse_OlfactoryBulb_Stahl_07012016_ST_"

STNET_TEST_PATIENTS = [  # datasets.md §2.3
    ["BC23277", "BC23287", "BC23508"], ["BC24105", "BC24220", "BC24223"], ["BC23803", "BC23377", "BC23895"],
    ["BC23272", "BC23288", "BC23903"], ["BC23270", "BC23268", "BC23567"], ["BC23269", "BC23810", "BC23901"],
    ["BC23209", "BC23450", "BC23506"], ["BC23944", "BC24044"],
]
STNET_SECTIONS = {  # datasets.md §2.2
    "BC23209": "C1 C2 D1", "BC23268": "C1 C2 D1", "BC23269": "C1 C2 D1", "BC23270": "D2 E1 E2",
    "BC23272": "D2 E1 E2", "BC23277": "D2 E1 E2", "BC23287": "C1 C2 D1", "BC23288": "D2 E1 E2",
    "BC23377": "C1 C2 D1", "BC23450": "D2 E1 E2", "BC23506": "C1 C2 D1", "BC23508": "D2 E1 E2",
    "BC23567": "D2 E1 E2", "BC23803": "D2 E1 E2", "BC23810": "D2 E1 E2", "BC23895": "C1 C2 D1",
    "BC23901": "C2 D1", "BC23903": "C1 C2 D1", "BC23944": "D2 E1 E2", "BC24044": "D2 E1 E2",
    "BC24105": "C1 C2 D1", "BC24220": "D2 E1 E2", "BC24223": "D2 E1 E2",
}
INT24_TESTS = ["INT1 INT17 INT24", "INT18 INT2 INT4", "INT10 INT21 INT7", "INT11 INT14 INT20",
               "INT12 INT13 INT23", "INT3 INT6 INT8", "INT16 INT19 INT9", "INT15 INT22 INT5"]
INT29_TESTS = ["INT20 INT24 INT35 INT8", "INT1 INT17 INT18 INT3", "INT2 INT21 INT23 INT7", "INT10 INT13 INT14 INT25",
               "INT11 INT12 INT4 INT5", "INT26 INT6 INT9", "INT16 INT19 INT28", "INT15 INT22 INT27"]
ZEN_TESTS = ["ZEN40 ZEN41 ZEN45 ZEN48", "ZEN42 ZEN47 ZEN49", "ZEN43 ZEN44 ZEN46"]
MOUSE_TESTS = [[10, 7, 8], [12, 3, 6], [11, 2, 9], [1, 4, 5]]
PCW_STAGES = {"4.5-5PCW": 4, "6.5PCW": 9, "9PCW": 6}


def quiet_folds(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return folds(*args, **kwargs)


def check_partition(fold_list, ids):
    for f in fold_list:
        assert sorted(f.train + f.test) == sorted(ids) and not set(f.train) & set(f.test)
    tested = [s for f in fold_list for s in f.test]
    assert sorted(tested) == sorted(ids)      # every sample is tested exactly once


def test_known_sample_lists():
    assert len(known_samples("stnet")) == 68 and len(known_samples("skin")) == 12
    assert len(known_samples("pcw")) == 19 and len(known_samples("mouse")) == 12
    assert len(known_samples("int")) == 24 and len(known_samples("zen")) == 10
    assert sorted(known_samples("stnet")) == sorted(f"{p}_{s}" for p, secs in STNET_SECTIONS.items()
                                                    for s in secs.split())
    assert "P10_ST_rep3" in known_samples("skin") and f"{MOUSE}Rep12" in known_samples("mouse")
    assert sorted(known_samples("pcw")) == sorted(f"{PCW}{stage}_{n}" for stage, k in PCW_STAGES.items()
                                                  for n in range(1, k + 1))
    with pytest.raises(NH2STError, match="nope"):
        known_samples("nope")


def test_stnet_folds_hold_out_whole_patients():
    got = folds("stnet")
    assert [f.index for f in got] == list(range(8))
    for f, patients in zip(got, STNET_TEST_PATIENTS):
        assert f.test == sorted(f"{p}_{s}" for p in patients for s in STNET_SECTIONS[p].split())
    check_partition(got, KNOWN_SAMPLES["stnet"])


def test_skin_leave_one_patient_out():
    got = folds("skin")
    assert [f.test for f in got] == [[f"{p}_ST_rep{r}" for r in (1, 2, 3)] for p in ("P2", "P5", "P9", "P10")]
    check_partition(got, KNOWN_SAMPLES["skin"])


def test_pcw_leave_one_stage_out():
    got = folds("pcw")
    assert [f.test for f in got] == [sorted(f"{PCW}{stage}_{n}" for n in range(1, k + 1))
                                     for stage, k in PCW_STAGES.items()]
    check_partition(got, KNOWN_SAMPLES["pcw"])


def test_mouse_folds_reproduce_the_suffix_sort_quirk_and_warn():
    with pytest.warns(UserWarning, match="mouse paper folds split by slide"):
        got = folds("mouse")
    assert [f.test for f in got] == [sorted(f"{MOUSE}Rep{r}" for r in reps) for reps in MOUSE_TESTS]
    check_partition(got, KNOWN_SAMPLES["mouse"])
    with pytest.raises(NH2STError, match="no animal id"):
        folds("mouse", split="patient")


def test_int_folds_for_the_24_and_the_29_id_sets():
    assert [" ".join(sorted(f.test)) for f in folds("int")] == [" ".join(sorted(t.split())) for t in INT24_TESTS]
    got = folds("int", INT_HEST_IDS)
    assert [f.test for f in got] == [sorted(t.split()) for t in INT29_TESTS]
    check_partition(got, INT_HEST_IDS)
    assert folds("int", split="patient") == folds("int")
    with pytest.raises(NH2STError, match="no patient label"):
        folds("int", INT_HEST_IDS, split="patient")


def test_zen_paper_folds_warn_and_patient_folds_do_not_leak():
    with pytest.warns(UserWarning, match="zen paper folds split by slide"):
        got = folds("zen")
    assert [f.test for f in got] == [sorted(t.split()) for t in ZEN_TESTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the patient split does not warn
        by_patient = folds("zen", split="patient")
    check_partition(by_patient, KNOWN_SAMPLES["zen"])
    assert len(by_patient) == 3
    pairs = [("ZEN44", "ZEN45"), ("ZEN46", "ZEN47"), ("ZEN48", "ZEN49")]   # one patient each
    for f in by_patient:
        for a, b in pairs:
            assert (a in f.test) == (b in f.test)
    assert [len(f.test) for f in by_patient] == [4, 3, 3]


def test_subset_keeps_paper_membership_and_reports_missing():
    # KFold over the paper's full list, then restricted: a missing slide moves nobody
    present = [s for s in KNOWN_SAMPLES["int"] if s not in ("INT2", "INT4", "INT18")]   # fold 1 empties
    got = folds("int", present)
    assert [f.index for f in got] == [0, 2, 3, 4, 5, 6, 7]
    assert [f.test for f in got] == [sorted(f.test) for f in folds("int") if f.index != 1]
    assert missing_samples("int", present) == ["INT2", "INT4", "INT18"]
    # grouped schemes: a fold is its patients, restricted to what is there
    got = folds("stnet", ["BC23277_D2", "BC23209_C1", "BC23209_C2"])
    assert [(f.index, f.test, f.train) for f in got] == [
        (0, ["BC23277_D2"], ["BC23209_C1", "BC23209_C2"]), (6, ["BC23209_C1", "BC23209_C2"], ["BC23277_D2"])]
    mouse = [f"{MOUSE}Rep{r}" for r in (1, 10, 12)]
    assert [(f.index, f.test) for f in quiet_folds("mouse", mouse)] == [
        (0, [f"{MOUSE}Rep10"]), (1, [f"{MOUSE}Rep12"]), (3, [f"{MOUSE}Rep1"])]


def test_exact_ids_never_substrings():
    with pytest.raises(NH2STError, match="INT100"):
        folds("int", ["INT1", "INT100", "INT2"])
    with pytest.raises(NH2STError, match="Rep1x"):
        quiet_folds("mouse", [f"{MOUSE}Rep1", f"{MOUSE}Rep1x"])
    with pytest.raises(NH2STError, match="P2_ST_rep10"):
        folds("skin", ["P2_ST_rep1", "P2_ST_rep10", "P5_ST_rep1"])
    with pytest.raises(NH2STError, match="--split"):
        folds("stnet", split="slide")
    with pytest.raises(NH2STError, match="no fold"):
        folds("skin", ["P2_ST_rep1", "P2_ST_rep2"])     # one patient: nothing to train on


def test_cli_json_is_the_only_stdout_and_warning_goes_to_stderr():
    result = CliRunner().invoke(app, ["splits", "--dataset", "zen", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == folds_as_dict(quiet_folds("zen"))
    assert json.loads(result.stdout)["1"]["test"] == ["ZEN42", "ZEN47", "ZEN49"]
    assert "leak" not in result.stdout and "split by slide" in result.stderr


def test_cli_table_and_patient_split():
    result = CliRunner().invoke(app, ["splits", "--dataset", "zen", "--split", "patient"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for f in folds("zen", split="patient"):
        assert " ".join(f.test) in result.stdout
    assert result.stderr == ""


def test_cli_data_root_uses_found_samples_and_reports_missing(tmp_path):
    coord = tmp_path / "STimage-1K4M" / "ST" / "coord"
    coord.mkdir(parents=True)
    for folder in ("gene_exp", "image"):
        (coord.parent / folder).mkdir()
    for rep in (1, 10, 12):
        (coord / f"{MOUSE}Rep{rep}_coord.csv").write_text(",yaxis,xaxis,r\n")
    (coord / f"{PCW}9PCW_1_coord.csv").write_text(",yaxis,xaxis,r\n")   # another dataset: ignored
    result = CliRunner().invoke(app, ["splits", "-d", "mouse", "--data-root", str(tmp_path / "STimage-1K4M"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert {k: v["test"] for k, v in got.items()} == {"0": [f"{MOUSE}Rep10"], "1": [f"{MOUSE}Rep12"],
                                                      "3": [f"{MOUSE}Rep1"]}
    assert "9 of the paper's mouse samples" in result.stderr and f"{MOUSE}Rep2," in result.stderr


def test_cli_errors_are_nh2st_errors():
    result = CliRunner().invoke(app, ["splits", "--dataset", "mouse", "--split", "patient"])
    assert result.exit_code != 0 and isinstance(result.exception, NH2STError)


# ---- folds for any dataset -------------------------------------------------------------------------------
OWN = ["S05", "S01", "S03", "S02", "S04", "S06", "S07"]


def test_kfold_over_samples_is_seeded_and_partitions():
    from sklearn.model_selection import KFold

    fold_list = folds("visium", OWN, "kfold:3")
    check_partition(fold_list, OWN)
    ids = sorted(OWN)
    expected = [sorted(ids[i] for i in test) for _, test in KFold(3, shuffle=True, random_state=42).split(ids)]
    assert [f.test for f in fold_list] == expected
    assert folds("visium", OWN, "kfold:3") == fold_list                       # same seed, same folds
    assert [f.test for f in folds("visium", OWN, "kfold:3", seed=7)] != expected
    assert [f.test for f in folds("visium", list(reversed(OWN)), "kfold:3")] == expected   # input order does not matter
    with pytest.raises(NH2STError, match="7 samples cannot make 8 folds"):
        folds("visium", OWN, "kfold:8")
    for bad in ("kfold:1", "kfold:x", "kfold"):
        with pytest.raises(NH2STError):
            folds("visium", OWN, bad)


def test_leave_one_out_and_paper_split_of_own_data():
    fold_list = folds("hest", OWN, "loo")
    assert [f.test for f in fold_list] == [[s] for s in sorted(OWN)] and len(fold_list[0].train) == 6
    check_partition(fold_list, OWN)
    with pytest.raises(NH2STError, match="visium has no paper folds; choose --split kfold:K, loo or patient"):
        folds("visium", OWN)
    with pytest.raises(NH2STError, match="visium has no known sample list"):
        folds("visium", None, "loo")
    with pytest.raises(NH2STError, match=r"--split 'stratified' is unknown; choose one of: paper, patient, patient:K"):
        folds("visium", OWN, "stratified")


def test_patient_splits_keep_each_patient_on_one_side():
    patients = {"S01": "B", "S02": "B", "S03": "A", "S04": "C", "S05": "C", "S06": "C", "S07": "D"}
    lopo = folds("visium", OWN, "patient", patients=patients)
    assert [f.test for f in lopo] == [["S03"], ["S01", "S02"], ["S04", "S05", "S06"], ["S07"]]   # A, B, C, D
    check_partition(lopo, OWN)
    balanced = folds("visium", OWN, "patient:2", patients=patients)
    # C (3 slides) -> fold 0, B (2) -> fold 1, A (1) -> fold 1, D (1) -> fold 0 (fewest slides, lowest index)
    assert [f.test for f in balanced] == [["S04", "S05", "S06", "S07"], ["S01", "S02", "S03"]]
    for f in balanced + lopo:
        assert not {patients[s] for s in f.train} & {patients[s] for s in f.test}
    with pytest.raises(NH2STError, match=r"patients.csv has no patient for sample\(s\) S07; add a line"):
        folds("visium", OWN, "patient", patients={k: v for k, v in patients.items() if k != "S07"},
              patients_source="patients.csv")
    with pytest.raises(NH2STError, match="--split patient:5: only 4 patients"):
        folds("visium", OWN, "patient:5", patients=patients)
    with pytest.raises(NH2STError, match="needs each sample's patient: pass --patients CSV"):
        folds("visium", OWN, "patient")
    with pytest.raises(NH2STError, match="belong to one patient"):
        folds("visium", OWN, "patient", patients=dict.fromkeys(OWN, "P"))
    # the paper's datasets: `patient` keeps their scheme unless patients are given; generic splits work on them too
    assert len(folds("zen", split="patient")) == 3
    from nh2st.splits import ZEN_PATIENTS
    assert len(folds("zen", split="patient", patients=ZEN_PATIENTS)) == 7         # explicit patients: one out each
    assert [f.test for f in folds("zen", split="patient:3")] == [f.test for f in folds("zen", split="patient")]
    check_partition(quiet_folds("stnet", split="patient:4"), known_samples("stnet"))
    for f in folds("stnet", split="patient:4"):
        assert not {s.split("_")[0] for s in f.train} & {s.split("_")[0] for s in f.test}


def test_patients_csv(tmp_path):
    from nh2st.splits import read_patients

    path = tmp_path / "patients.csv"
    path.write_text("Sample,Patient,notes\nS01,P1,x\nS02,P1,\nS03, P2 ,y\nS01,P1,again\n")
    assert read_patients(path) == {"S01": "P1", "S02": "P1", "S03": "P2"}
    path.write_text("sample_id\tdonor\nA\td1\nB\td2\n")                       # tab-separated works too
    assert read_patients(path) == {"A": "d1", "B": "d2"}
    path.write_text("slide,who\nA,1\n")
    with pytest.raises(NH2STError, match=r"patients.csv: needs a header with a sample column .* found: slide, who"):
        read_patients(path)
    path.write_text("sample,patient\nA,1\nA,2\n")
    with pytest.raises(NH2STError, match="sample A is given two patients"):
        read_patients(path)
    path.write_text("sample,patient\nA,\n")
    with pytest.raises(NH2STError, match="line 2 has an empty sample or patient"):
        read_patients(path)
    with pytest.raises(NH2STError, match="file not found"):
        read_patients(tmp_path / "nope.csv")


def test_cli_patient_split_from_a_csv_and_from_a_store(tmp_path):
    from nh2st.store import EmbeddingStore, StoreMeta

    csv = tmp_path / "patients.csv"
    csv.write_text("sample,patient\nS01,B\nS02,B\nS03,A\n")
    result = CliRunner().invoke(app, ["splits", "-d", "visium", "--samples", "S01", "S02", "S03", "--split", "patient",
                                      "--patients", str(csv), "--json"])
    assert result.exit_code == 0, result.output
    assert {k: v["test"] for k, v in json.loads(result.stdout).items()} == {"0": ["S03"], "1": ["S01", "S02"]}
    csv.write_text("sample,patient\nS01,B\nS02,B\n")
    result = CliRunner().invoke(app, ["splits", "-d", "visium", "--samples", "S01,S02,S03", "--split", "patient",
                                      "--patients", str(csv)])
    assert isinstance(result.exception, NH2STError) and "has no patient for sample(s) S03" in str(result.exception)

    # a store: the dataset, its samples and the patients its reader recorded in each sample's info
    meta = StoreMeta(dataset="hest", genes=["G"], backbone="b", weights="w", weights_sha256="0" * 64)
    with EmbeddingStore.open_for_writing(tmp_path / "s.zarr", meta) as store:
        from store_fixtures import write_spots
        import numpy as np
        for sample_id, patient in (("T1", "P1"), ("T2", "P2"), ("T3", "P1")):
            write_spots(store, sample_id, np.zeros((3, 512, 7, 7)), np.ones((3, 1), np.float32),
                        np.array([[0, 0], [1, 1], [2, 0]]), np.array([[0.0, 0], [9, 9], [20, 0]]))
            store.root["samples"][sample_id].attrs["meta"] = {"patient": patient}
    result = CliRunner().invoke(app, ["splits", "--store", str(tmp_path / "s.zarr"), "--split", "patient", "--json"])
    assert result.exit_code == 0, result.output
    assert {k: v["test"] for k, v in json.loads(result.stdout).items()} == {"0": ["T1", "T3"], "1": ["T2"]}
    result = CliRunner().invoke(app, ["splits", "--store", str(tmp_path / "s.zarr"), "--split", "kfold:3", "--json"])
    assert sorted(t for v in json.loads(result.stdout).values() for t in v["test"]) == ["T1", "T2", "T3"]
