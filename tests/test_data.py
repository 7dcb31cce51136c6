"""Tests for labutils.data: the three IMDb sources, schemas, the embedded sample, tokenization."""

from __future__ import annotations

import hashlib
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub from the tests
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from labutils import data  # noqa: E402
from labutils.data import DataSourceError, load_imdb, make_imdb_sample, tokenize_imdb  # noqa: E402

SOURCE_NAMES = ("'local'", "'hub'", "'sample'", "LABBOOK_IMDB_DIR", "HF_HUB_OFFLINE")


def _fake_split(split: str, n_per_class: int) -> pa.Table:
    """A sorted (neg then pos) table like the real files, with recognisable texts."""
    texts = [f"{split} review {i} label {i // n_per_class}" for i in range(2 * n_per_class)]
    labels = [i // n_per_class for i in range(2 * n_per_class)]
    return pa.table({"text": texts, "label": pa.array(labels, pa.int64())})


@pytest.fixture
def imdb_dir(tmp_path: Path) -> Path:
    """A local IMDb folder: train 30 + 30, test 20 + 20."""
    folder = tmp_path / "imdb"
    folder.mkdir()
    pq.write_table(_fake_split("train", 30), folder / "train.parquet")
    pq.write_table(_fake_split("test", 20), folder / "test.parquet")
    return folder


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path):
    monkeypatch.delenv("LABBOOK_IMDB_DIR", raising=False)
    monkeypatch.setenv("LABBOOK_CACHE_DIR", str(tmp_path / "cache"))


def _assert_names_three_sources(message: str) -> None:
    for name in SOURCE_NAMES:
        assert name in message, f"{name} missing from: {message}"


# ----------------------------------------------------------------------------- embedded sample


@pytest.mark.parametrize("split", ["train", "test"])
def test_sample_is_balanced_2000_reviews_with_hub_schema(split):
    ds = load_imdb(split, source="sample")
    assert len(ds) == 2000
    assert ds.features == data.IMDB_FEATURES
    labels = np.array(ds["label"])
    assert (labels == 0).sum() == 1000 and (labels == 1).sum() == 1000
    assert all(isinstance(t, str) and len(t) > 20 for t in ds["text"])
    assert len(set(ds["text"])) == 2000  # repeated reviews of the full set were left out
    assert "'sample'" in ds.info.description


def test_sample_files_match_provenance_and_are_small():
    folder = data.sample_dir()
    provenance = json.loads((folder / "imdb_sample.json").read_text())
    total = 0
    for entry in provenance["splits"].values():
        blob = (folder / entry["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert entry["rows"] == 2000 and entry["rows_per_label"] == {"neg": 1000, "pos": 1000}
        assert (
            pq.ParquetFile(folder / entry["file"]).metadata.row_group(0).column(0).compression
            == "ZSTD"
        )
        total += len(blob)
    assert total < 3_000_000
    assert provenance["seed"] == 0


def test_sample_texts_come_from_the_train_and_test_splits_disjointly():
    train, test = (
        set(load_imdb("train", source="sample")["text"]),
        set(load_imdb("test", source="sample")["text"]),
    )
    assert not train & test


def test_make_sample_is_deterministic_and_stratified(imdb_dir, tmp_path):
    first = make_imdb_sample(imdb_dir, tmp_path / "a", n_per_split_per_class=7, seed=5)
    make_imdb_sample(imdb_dir, tmp_path / "b", n_per_split_per_class=7, seed=5)
    make_imdb_sample(imdb_dir, tmp_path / "c", n_per_split_per_class=7, seed=6)
    for name in ("imdb_train.parquet", "imdb_test.parquet", "imdb_sample.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "imdb_train.parquet").read_bytes() != (
        tmp_path / "c" / "imdb_train.parquet"
    ).read_bytes()
    for split in ("train", "test"):
        table = pq.read_table(tmp_path / "a" / f"imdb_{split}.parquet")
        source = pq.read_table(imdb_dir / f"{split}.parquet")
        assert table.schema == pa.schema([("text", pa.string()), ("label", pa.int64())])
        labels = table.column("label").to_numpy()
        assert (labels == 0).sum() == 7 and (labels == 1).sum() == 7
        assert labels.tolist() != sorted(labels.tolist())  # shuffled, not neg-then-pos
        rows = set(zip(table.column("text").to_pylist(), labels.tolist(), strict=True))
        assert rows <= set(
            zip(source.column("text").to_pylist(), source.column("label").to_pylist(), strict=True)
        )
        assert (
            first["splits"][split]["source_sha256"]
            == hashlib.sha256((imdb_dir / f"{split}.parquet").read_bytes()).hexdigest()
        )


def test_make_sample_never_draws_repeated_texts(tmp_path):
    folder = tmp_path / "dups"
    folder.mkdir()
    train, test = _fake_split("train", 6).to_pydict(), _fake_split("test", 6).to_pydict()
    train["text"][0] = test["text"][1] = "seen in both splits"
    train["text"][7] = train["text"][8] = "seen twice in train"
    pq.write_table(pa.table(train), folder / "train.parquet")
    pq.write_table(pa.table(test), folder / "test.parquet")
    provenance = make_imdb_sample(folder, tmp_path / "o", n_per_split_per_class=4)
    drawn = pq.read_table(tmp_path / "o" / "imdb_train.parquet").column("text").to_pylist()
    drawn += pq.read_table(tmp_path / "o" / "imdb_test.parquet").column("text").to_pylist()
    assert len(set(drawn)) == 16
    assert not {"seen in both splits", "seen twice in train"} & set(drawn)
    assert provenance["splits"]["train"]["source_rows_with_repeated_text_excluded"] == 3
    with pytest.raises(ValueError, match="needs 5 'pos' reviews but this split has only 4"):
        make_imdb_sample(folder, tmp_path / "o", n_per_split_per_class=5)


def test_make_sample_command_line(imdb_dir, tmp_path, capsys):
    assert (
        data.main(
            [
                "make-sample",
                "--from",
                str(imdb_dir),
                "--out",
                str(tmp_path / "o"),
                "--per-class",
                "3",
            ]
        )
        == 0
    )
    assert "train: 6 rows" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "o" / "imdb_test.parquet").num_rows == 6


def test_make_sample_rejects_too_many_per_class(imdb_dir, tmp_path):
    with pytest.raises(ValueError, match="sample=62"):
        make_imdb_sample(imdb_dir, tmp_path / "o", n_per_split_per_class=31)


def _full_imdb_matching_provenance() -> str | None:
    """$LABBOOK_IMDB_DIR when it holds the exact files the embedded sample was drawn from."""
    folder = os.environ.get("LABBOOK_IMDB_DIR")
    if not folder:
        return None
    provenance = json.loads((data.sample_dir() / "imdb_sample.json").read_text())
    for entry in provenance["splits"].values():
        path = Path(folder) / entry["source_file"]
        if (
            not path.is_file()
            or hashlib.sha256(path.read_bytes()).hexdigest() != entry["source_sha256"]
        ):
            return None
    return folder


FULL_IMDB_DIR = _full_imdb_matching_provenance()  # read before the fixtures clear the variable


@pytest.mark.slow
@pytest.mark.skipif(
    FULL_IMDB_DIR is None, reason="needs LABBOOK_IMDB_DIR with the full IMDb Parquet files"
)
def test_embedded_sample_regenerates_byte_for_byte(tmp_path):
    make_imdb_sample(FULL_IMDB_DIR, tmp_path)
    for name in ("imdb_train.parquet", "imdb_test.parquet", "imdb_sample.json"):
        assert (tmp_path / name).read_bytes() == (data.sample_dir() / name).read_bytes()


# ------------------------------------------------------------------- local folder and precedence


def test_local_folder_is_read_and_validated(imdb_dir):
    ds = load_imdb("train", data_dir=imdb_dir)
    assert len(ds) == 60 and "'local'" in ds.info.description
    assert ds.features == data.IMDB_FEATURES
    assert set(ds["text"]) == set(_fake_split("train", 30).column("text").to_pylist())
    for text, label in zip(ds["text"], ds["label"], strict=True):
        assert text.endswith(f"label {label}")


def test_hub_style_shards_are_read(tmp_path):
    table = _fake_split("test", 4)
    pq.write_table(table.slice(0, 5), tmp_path / "test-00000-of-00002.parquet")
    pq.write_table(table.slice(5), tmp_path / "test-00001-of-00002.parquet")
    ds = load_imdb("test", data_dir=tmp_path, shuffle=False)
    assert ds["text"] == table.column("text").to_pylist()


def test_env_var_selects_local_folder(imdb_dir, monkeypatch):
    monkeypatch.setenv("LABBOOK_IMDB_DIR", str(imdb_dir))
    assert len(load_imdb("test")) == 40
    assert len(load_imdb("test", source="sample")) == 2000  # an explicit source wins


def test_data_dir_argument_beats_env_var(imdb_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(_fake_split("test", 3), other / "test.parquet")
    monkeypatch.setenv("LABBOOK_IMDB_DIR", str(imdb_dir))
    assert len(load_imdb("test", data_dir=other)) == 6


def test_env_var_to_missing_folder_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("LABBOOK_IMDB_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataSourceError, match="does not exist") as err:
        load_imdb("train")
    _assert_names_three_sources(str(err.value))


def test_local_without_folder_names_the_three_sources():
    with pytest.raises(DataSourceError) as err:
        load_imdb("train", source="local")
    _assert_names_three_sources(str(err.value))
    assert isinstance(err.value, OSError)


def test_local_folder_without_the_split(imdb_dir):
    (imdb_dir / "test.parquet").unlink()
    with pytest.raises(DataSourceError, match="no test.parquet"):
        load_imdb("test", data_dir=imdb_dir)


# ----------------------------------------------------------------------------- hub (simulated)


def test_hub_offline_by_env_never_touches_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    assert data.hub_offline_by_env()
    assert not data.hub_reachable()
    assert "'sample'" in load_imdb("train").info.description


@pytest.mark.parametrize(
    ("failure", "reachable"),
    [
        (data.urllib.error.HTTPError("u", 401, "Unauthorized", None, None), True),
        (data.urllib.error.URLError("Name or service not known"), False),
        (TimeoutError("timed out"), False),
    ],
)
def test_hub_probe_is_one_request_remembered(monkeypatch, failure, reachable):
    calls = []

    def fake_urlopen(request, timeout):
        calls.append((request.get_method(), request.full_url, timeout))
        raise failure

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"https://hub.invalid/{reachable}")
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    data._probe.cache_clear()
    assert data.hub_reachable(timeout=0.5) is reachable
    assert data.hub_reachable(timeout=0.5) is reachable
    data._probe.cache_clear()
    assert calls == [
        ("HEAD", f"https://hub.invalid/{reachable}/api/datasets/stanfordnlp/imdb", 0.5)
    ]


def test_unreachable_hub_gives_the_clear_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset called")
    )
    with pytest.raises(DataSourceError, match="not reachable") as err:
        load_imdb("train", source="hub")
    _assert_names_three_sources(str(err.value))
    assert "'sample'" in load_imdb("train").info.description  # auto falls through to the sample


def test_offline_hub_without_cache_gives_the_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/imdb' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="OfflineModeIsEnabled") as err:
        load_imdb("test", source="hub")
    _assert_names_three_sources(str(err.value))
    assert isinstance(err.value.__cause__, ConnectionError)


def _fake_hub_dataset(split: str) -> datasets.Dataset:
    table = _fake_split(split, 5)
    return datasets.Dataset.from_dict(
        {"text": table.column("text").to_pylist(), "label": table.column("label").to_pylist()},
        features=data.IMDB_FEATURES,
    )


def test_online_auto_uses_the_hub(monkeypatch):
    calls = []

    def fake_load_dataset(name, *, split):
        calls.append((name, split))
        return _fake_hub_dataset(split)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_imdb("train")
    assert calls == [("stanfordnlp/imdb", "train")]
    assert len(ds) == 10 and "'hub'" in ds.info.description


def test_online_auto_falls_back_to_sample_when_the_hub_fails(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("slow"))
    )
    with pytest.warns(UserWarning, match="embedded IMDb sample"):
        ds = load_imdb("train")
    assert len(ds) == 2000


# ----------------------------------------------------------------------------- schema and arguments


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"review": ["a"], "sentiment": [1]}), r"missing column\(s\) \['text', 'label'\]"),
        (pa.table({"text": ["a"], "label": ["pos"]}), "'label' must hold integers"),
        (pa.table({"text": [1], "label": [1]}), "'text' must hold strings"),
        (pa.table({"text": ["a", "b"], "label": [0, 2]}), r"must be 0 or 1, found values \[2\]"),
        (pa.table({"text": ["a", None], "label": [0, 1]}), "'text' has 1 null"),
    ],
)
def test_wrong_schema_is_a_clear_error(tmp_path, table, message):
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=message) as err:
        load_imdb("train", data_dir=tmp_path)
    assert "train.parquet" in str(err.value)


def test_extra_columns_are_dropped_and_label_is_cast(tmp_path):
    table = pa.table({"text": ["good", "bad"], "label": pa.array([1, 0], pa.int8()), "id": [7, 8]})
    pq.write_table(table, tmp_path / "test.parquet")
    ds = load_imdb("test", data_dir=tmp_path, shuffle=False)
    assert ds.column_names == ["text", "label"] and ds["label"] == [1, 0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"split": "validation"}, ValueError, "split must be one of"),
        ({"split": "train", "source": "web"}, ValueError, "source must be one of"),
        ({"split": "train", "sample": 0}, ValueError, "sample must be a positive int"),
        ({"split": "train", "sample": True}, ValueError, "sample must be a positive int"),
        ({"split": "train", "sample": 2001}, ValueError, "sample=2001 needs 1001 'pos'"),
        ({"split": "train", "seed": 1.5}, TypeError, "seed must be an int"),
        ({"split": "train", "source": "hub", "data_dir": "x"}, ValueError, "data_dir is only used"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    split = kwargs.pop("split")
    with pytest.raises(error, match=message):
        load_imdb(split, **kwargs)


# ----------------------------------------------------------------------------- subsets and order


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_subsample_is_balanced_and_without_repeats(n, seed):
    ds = load_imdb("test", source="sample", sample=n, seed=seed)
    labels = np.array(ds["label"])
    assert len(ds) == n
    assert (labels == 0).sum() == n // 2 and (labels == 1).sum() == n - n // 2
    assert len(set(ds["text"])) == n


def test_same_seed_same_rows_other_seed_other_rows():
    a = load_imdb("train", source="sample", sample=50, seed=1)
    b = load_imdb("train", source="sample", sample=50, seed=1)
    c = load_imdb("train", source="sample", sample=50, seed=2)
    assert a["text"] == b["text"] and a._fingerprint == b._fingerprint
    assert a["text"] != c["text"] and a._fingerprint != c._fingerprint


def test_rows_are_shuffled_unless_asked_not_to(imdb_dir):
    shuffled = load_imdb("train", data_dir=imdb_dir)
    ordered = load_imdb("train", data_dir=imdb_dir, shuffle=False)
    assert ordered["text"] == _fake_split("train", 30).column("text").to_pylist()
    assert shuffled["text"] != ordered["text"] and sorted(shuffled["text"]) == sorted(
        ordered["text"]
    )
    assert sum(shuffled["label"][:10]) not in (0, 10)  # neg-then-pos order is broken up


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    from labutils.models import load_tokenizer

    return load_tokenizer()


def test_tokenize_shapes_dtypes_and_labels(tokenizer, tmp_path):
    ds = load_imdb("train", source="sample", sample=24, seed=0)
    tok = tokenize_imdb(ds, tokenizer, max_length=32, cache=tmp_path)
    assert tok.column_names == ["label", "input_ids", "attention_mask"]
    batch = tok[:24]
    assert batch["input_ids"].shape == (24, 32) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (24, 32)
    assert batch["label"].tolist() == ds["label"]
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    expected = tokenizer(ds["text"][0], truncation=True, max_length=32)["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected


def test_tokenize_second_call_hits_the_cache(tokenizer, tmp_path, monkeypatch):
    ds = load_imdb("test", source="sample", sample=16, seed=3)
    first = tokenize_imdb(ds, tokenizer, max_length=24, cache=tmp_path)
    files = sorted((tmp_path / "tokenized").glob("imdb-*.arrow"))
    assert len(files) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(data, "_encode_batch", must_not_run)
    again = tokenize_imdb(
        load_imdb("test", source="sample", sample=16, seed=3), tokenizer, 24, cache=tmp_path
    )
    assert again.cache_files[0]["filename"] == str(files[0])
    assert torch.equal(again[:]["input_ids"], first[:]["input_ids"])
    with pytest.raises(
        AssertionError, match="tokenized again"
    ):  # another max_length is another entry
        tokenize_imdb(ds, tokenizer, max_length=25, cache=tmp_path)


def test_tokenize_cache_dir_from_env(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LABBOOK_CACHE_DIR", str(tmp_path / "env_cache"))
    tokenize_imdb(load_imdb("test", source="sample", sample=4), tokenizer, max_length=16)
    assert len(list((tmp_path / "env_cache" / "tokenized").glob("imdb-*.arrow"))) == 1


def test_tokenize_rejects_bad_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 0"):
        tokenize_imdb(load_imdb("test", source="sample", sample=4), tokenizer, max_length=0)


# ----------------------------------------------------------------------------- damaged files (issue 13)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # a copy cut short
        lambda b: b[:-9],  # only the footer's end missing
        lambda b: b"",  # an empty file
        lambda b: b"PAR1" + bytes(64),  # a header and nothing else
        lambda b: b"<html>rate limited</html>",  # what a failed download saves
    ],
)
def test_truncated_or_corrupt_parquet_names_the_file_and_never_falls_back(imdb_dir, monkeypatch, damage):
    path = imdb_dir / "train.parquet"
    path.write_bytes(damage(path.read_bytes()))
    monkeypatch.setenv("LABBOOK_IMDB_DIR", str(imdb_dir))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no hub when a folder is set"))
    for source in ("auto", "local"):
        with pytest.raises(DataSourceError, match="cannot be read as Parquet") as info:
            load_imdb("train", source=source)
        assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert len(load_imdb("test")) == 40  # the intact split still loads


def test_a_parquet_file_of_another_data_set_names_the_file_and_the_columns(imdb_dir, monkeypatch):
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": [0, 1]}), imdb_dir / "test.parquet")
    monkeypatch.setenv("LABBOOK_IMDB_DIR", str(imdb_dir))
    with pytest.raises(ValueError, match=r"test.parquet: missing column\(s\) \['text'\]; found columns \['sentence', 'label'\]"):
        load_imdb("test")
