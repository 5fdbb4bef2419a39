"""Tests for pipeline.glue: the real GLUE files, and strict errors on small bad files."""

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.glue import (
    FRAME_COLUMNS,
    glue_split_path,
    read_file_split,
    read_glue_split,
    read_table,
    read_text_lines,
)
from pipeline.tasks import GLUE_TASKS, make_task

DEFAULT_GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/glue"
GLUE_DIR = Path(os.environ.get("GLUE_DIR") or DEFAULT_GLUE_DIR)
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")

OFFICIAL_ROWS = [
    ("cola", "train", 8551), ("cola", "dev", 1043), ("sst2", "train", 67349), ("sst2", "dev", 872),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("rte", "train", 2490), ("rte", "dev", 277),
    ("stsb", "train", 5749), ("stsb", "dev", 1500), ("wnli", "train", 635), ("wnli", "dev", 71),
    ("qnli", "dev", 5463),
]
RTE = GLUE_TASKS["rte"]
RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def check_frame(df: pd.DataFrame, task) -> None:
    assert tuple(df.columns) == FRAME_COLUMNS
    assert df["example_id"].dtype == np.int64
    assert np.array_equal(df["example_id"].to_numpy(), np.arange(len(df)))
    assert df["label"].dtype == (np.int64 if task.kind == "classification" else np.float32)
    assert all(isinstance(t, str) and t.strip() for t in df["text_a"])
    if task.is_pair:
        assert all(isinstance(t, str) and t.strip() for t in df["text_b"])
    else:
        assert (df["text_b"] == "").all()


@needs_glue
@pytest.mark.parametrize("name, split, rows", OFFICIAL_ROWS)
def test_real_glue_files_have_official_row_counts(name, split, rows):
    task = GLUE_TASKS[name]
    df = read_glue_split(GLUE_DIR, task, split)
    assert len(df) == rows
    check_frame(df, task)
    if task.kind == "classification":
        assert set(df["label"]) == set(range(task.num_outputs))
    else:
        assert df["label"].min() == 0.0 and df["label"].max() == 5.0


@needs_glue
def test_real_glue_first_rows_verbatim():
    mrpc = read_glue_split(GLUE_DIR, GLUE_TASKS["mrpc"], "train", limit=1)
    assert mrpc["text_a"][0].startswith("Amrozi accused his brother")  # no BOM artefact
    assert "\ufeff" not in mrpc["text_a"][0] and mrpc["label"][0] == 1
    assert mrpc["text_b"][0].startswith('Referring to him as only " the witness "')
    sst2 = read_glue_split(GLUE_DIR, GLUE_TASKS["sst2"], "train", limit=3)
    assert len(sst2) == 3
    assert sst2["text_a"][0] == "hide new secretions from the parental units "  # as GLUE/HF keep it
    cola = read_glue_split(GLUE_DIR, GLUE_TASKS["cola"], "dev", limit=2)
    assert cola["text_a"].tolist()[0] == "The sailors rode the breeze clear of the rocks."
    stsb = read_glue_split(GLUE_DIR, GLUE_TASKS["stsb"], "dev", limit=1)
    assert stsb["label"][0] == np.float32(5.0)


@needs_glue
def test_sst2_train_reads_fast():
    start = time.perf_counter()
    read_glue_split(GLUE_DIR, GLUE_TASKS["sst2"], "train")
    assert time.perf_counter() - start < 1.0


def test_glue_split_path_layout(tmp_path):
    (tmp_path / "mnli").mkdir()
    (tmp_path / "mnli" / "dev_matched.tsv").write_text("x\n")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("x\n")
    assert glue_split_path(tmp_path, "mnli", "dev") == tmp_path / "mnli" / "dev_matched.tsv"
    assert glue_split_path(str(tmp_path), "SST-2", "train") == tmp_path / "sst2" / "train.tsv"
    with pytest.raises(ConfigError, match="unknown GLUE split 'test'"):
        glue_split_path(tmp_path, "sst2", "test")
    with pytest.raises(ConfigError, match="did you mean 'sst2'"):
        glue_split_path(tmp_path, "sst", "train")


def test_missing_glue_folder_or_file_mentions_glue_dir(tmp_path):
    with pytest.raises(DataError, match="GLUE_DIR.*data.glue_dir") as info:
        read_glue_split(tmp_path / "nope", RTE, "train")
    assert "nope" in str(info.value)
    (tmp_path / "sst2").mkdir()
    with pytest.raises(DataError, match=r"rte.*train\.tsv.*not found.*\['sst2'\].*GLUE_DIR"):
        read_glue_split(tmp_path, RTE, "train")
    with pytest.raises(DataError, match="GLUE_DIR"):
        read_glue_split("", RTE, "train")


def write_rte(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "rte" / "train.tsv"
    path.parent.mkdir(exist_ok=True)
    path.write_text(RTE_HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_unbalanced_quotes_and_crlf_read_verbatim(tmp_path):
    path = tmp_path / "quotes.tsv"
    path.write_bytes(
        b'index\tsentence1\tsentence2\tlabel\r\n'
        b'0\t" He said\tit "was\tentailment\r\n'
        b'1\tb\tc\tnot_entailment'  # no final newline, like CoLA dev
    )
    df = read_table(path, RTE)
    assert df["text_a"].tolist() == ['" He said', "b"]
    assert df["text_b"].tolist() == ['it "was', "c"]
    assert df["label"].tolist() == [0, 1]


def test_bad_label_names_file_line_and_column(tmp_path):
    path = write_rte(tmp_path, "0\ta\tb\tentailment", "1\ta\tb\tEntailment")
    with pytest.raises(DataError) as info:
        read_glue_split(tmp_path, RTE, "train")
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg
    assert "column 'label'" in msg and "'Entailment'" in msg


def test_bad_score_names_line(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text("s1\ts2\tscore\na\tb\t1.5\na\tb\thigh\n")
    with pytest.raises(DataError, match=r"line 3, column 'score': score 'high'"):
        read_table(path, make_task("sts", ["s1", "s2"], "score", kind="regression"))


def test_empty_text_names_line_and_column(tmp_path):
    write_rte(tmp_path, "0\ta\tb\tentailment", "1\ta\tb\tentailment", "2\ta\t  \tentailment")
    with pytest.raises(DataError, match=r"train\.tsv line 4, column 'sentence2': empty text"):
        read_glue_split(tmp_path, RTE, "train")


def test_wrong_field_count_names_line(tmp_path):
    write_rte(tmp_path, "0\ta\tb\tentailment", "1\ta\tb")
    with pytest.raises(DataError, match=r"train\.tsv line 3: expected 4 fields .* found 3"):
        read_glue_split(tmp_path, RTE, "train")


def test_non_utf8_names_line(tmp_path):
    path = write_rte(tmp_path, "0\ta\tb\tentailment")
    path.write_bytes(path.read_bytes() + b"1\tcaf\xe9\tb\tentailment\n")
    with pytest.raises(DataError, match=r"train\.tsv line 3: byte 0xe9 .* not valid UTF-8"):
        read_glue_split(tmp_path, RTE, "train")
    with pytest.raises(DataError, match="line 3"):
        read_text_lines(path)


def test_cola_layout_without_header(tmp_path):
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "dev.tsv").write_text("gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one one.")
    df = read_glue_split(tmp_path, GLUE_TASKS["cola"], "dev")
    assert df["text_a"].tolist() == ["Good one.", "Bad one one."] and df["label"].tolist() == [1, 0]
    check_frame(df, GLUE_TASKS["cola"])


def test_read_text_lines(tmp_path):
    path = tmp_path / "unlabeled.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    df = read_text_lines(path)
    assert tuple(df.columns) == FRAME_COLUMNS
    assert df["text_a"].tolist() == ["first line", "second line"]
    assert df["example_id"].tolist() == [0, 1] and df["label"].tolist() == [-1, -1]
    assert df["label"].dtype == np.int64 and (df["text_b"] == "").all()
    with pytest.raises(DataError, match="not found"):
        read_text_lines(tmp_path / "missing.txt")


REVIEWS = make_task("reviews", ["text"], "stars", ["bad", "good"])


def test_read_file_split_formats_agree(tmp_path):
    rows = [{"text": "nice, really", "stars": "good"}, {"text": 'so "bad"', "stars": "bad"}]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    pd.DataFrame(rows).to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.tsv").write_text("stars\ttext\ngood\tnice, really\nbad\tso \"bad\"\n")
    for name in ("r.csv", "r.jsonl", "r.parquet", "r.tsv"):
        df = read_file_split(tmp_path / name, REVIEWS)
        assert df["text_a"].tolist() == ["nice, really", 'so "bad"'], name
        assert df["label"].tolist() == [1, 0], name
        check_frame(df, REVIEWS)
        assert len(read_file_split(tmp_path / name, REVIEWS, limit=1)) == 1


def test_read_file_split_missing_column_lists_file_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("review,rating\ngreat,good\n")
    expected = r"r\.csv.*needs columns \['text', 'stars'\].*has \['review', 'rating'\]"
    with pytest.raises(DataError, match=expected):
        read_file_split(path, REVIEWS)
    df = read_file_split(path, REVIEWS, {"text": "review", "stars": "rating"})
    assert df["text_a"].tolist() == ["great"] and df["label"].tolist() == [1]
    with pytest.raises(ConfigError, match="column_map keys \\['txt'\\]"):
        read_file_split(path, REVIEWS, {"txt": "review"})


def test_read_file_split_errors_name_lines(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text('text,stars\n"two\nlines",good\nok,meh\n')  # row 2 starts on line 4
    with pytest.raises(DataError, match=r"r\.csv line 4, column 'stars': label 'meh'"):
        read_file_split(csv_path, REVIEWS)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"text": "a", "stars": "good"}\n\n{"text": null, "stars": "bad"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl line 3, column 'text': missing text"):
        read_file_split(jsonl, REVIEWS)
    binary = make_task("b", ["text"], "label", ["0", "1"])
    pd.DataFrame({"text": ["a", "b"], "label": [1, 2]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet row 2, column 'label': label '2'"):
        read_file_split(tmp_path / "b.parquet", binary)
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        read_file_split(tmp_path / "r.xlsx", REVIEWS)
    with pytest.raises(DataError, match="not found"):
        read_file_split(tmp_path / "none.csv", REVIEWS)


def test_check_available_names_what_is_missing_before_any_work(tmp_path):
    """Every file a run reads is checked up front (jobs call this before Ray starts)."""
    from pipeline.config import load
    from pipeline.data import check_available

    (tmp_path / "sst2").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\nfine\t1\n")
    check_available(load(None, [f"data.glue_dir={tmp_path}"]).data)  # all there: no error
    with pytest.raises(DataError, match=r"mrpc/train.tsv.*task folders.*\['sst2'\]"):
        check_available(load(None, [f"data.glue_dir={tmp_path}", "data.tasks=[sst2,mrpc]"]).data)
    with pytest.raises(DataError, match="is not a folder"):
        check_available(load(None, [f"data.glue_dir={tmp_path}/none"]).data)
    with pytest.raises(DataError, match="unlabeled_path=.*nope.txt does not exist"):
        check_available(load(None, [f"data.glue_dir={tmp_path}", f"data.unlabeled_path={tmp_path}/nope.txt"]).data)
    mine = ("data.custom_tasks=[{name: mine, text_columns: [text], labels: [a, b], "
            f"train_path: {tmp_path}/sst2/train.tsv, dev_path: {tmp_path}/missing.csv}}]")
    with pytest.raises(DataError, match="task mine: data.custom_tasks dev_path .*missing.csv does not exist"):
        check_available(load(None, [f"data.glue_dir={tmp_path}", "data.tasks=[mine]", mine]).data)
