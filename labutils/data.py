"""IMDb movie reviews, offline first: a local Parquet folder, the Hugging Face Hub, or the sample
shipped inside this package.

``load_imdb(split)`` returns a ``datasets.Dataset`` with the schema of ``stanfordnlp/imdb``:
``text`` (string) and ``label`` (0 = neg, 1 = pos). Where the reviews come from
(``source="auto"``, the default, tries them in this order):

1. ``"local"``: a folder holding ``train.parquet`` and ``test.parquet`` (or hub-style shards
   ``train-00000-of-00001.parquet``), given as ``data_dir=`` or by the environment variable
   ``LABBOOK_IMDB_DIR``. A folder that was asked for but cannot be read is an error, never a
   silent fallback.
2. ``"hub"``: ``datasets.load_dataset("stanfordnlp/imdb")``, tried only when the Hub answers a
   3-second probe and neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` is set.
3. ``"sample"``: 2,000 train + 2,000 test reviews shipped in ``labutils/_data/`` (balanced,
   drawn with a fixed seed from the full set; see ``make_imdb_sample``). This is what the book
   and CI read, so their numbers do not depend on the machine.

The full set's rows are sorted (all negatives, then all positives), so ``load_imdb`` returns
rows in a seeded random order. ``tokenize_imdb`` tokenizes once and caches the result on disk.

Regenerate the embedded sample (same bytes every time, for a given pyarrow version)::

    python -m labutils.data make-sample --from /path/to/imdb_parquet_folder
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

try:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "labutils.data needs the Hugging Face stack: pip install 'labutils[hf]'"
    ) from err

__all__ = [
    "DataSourceError",
    "HUB_ID",
    "IMDB_FEATURES",
    "SampleSpec",
    "cache_dir",
    "hub_offline_by_env",
    "hub_reachable",
    "load_imdb",
    "make_imdb_sample",
    "sample_dir",
    "tokenize_imdb",
]

HUB_ID = "stanfordnlp/imdb"
ENV_DATA_DIR = "LABBOOK_IMDB_DIR"
ENV_CACHE_DIR = "LABBOOK_CACHE_DIR"
SPLITS = ("train", "test")
SOURCES = ("auto", "local", "hub", "sample")
LABEL_NAMES = ("neg", "pos")
IMDB_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
)
_ARROW_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64())])
_SAMPLE_FILE = "imdb_{split}.parquet"
_SAMPLE_PROVENANCE = "imdb_sample.json"
_TOKENIZED_FORMAT_VERSION = 1  # bump when _encode_batch changes, to invalidate old caches


class DataSourceError(OSError):
    """No requested IMDb source could be read. The message says how to configure each one."""


def _sources_help(problem: str) -> str:
    return (
        f"{problem}\n"
        "IMDb can come from three sources (load_imdb(split, source=...)):\n"
        f"  - 'local':  a folder with train.parquet and test.parquet (columns text, label); pass "
        f"data_dir=... or set the environment variable {ENV_DATA_DIR}.\n"
        f"  - 'hub':    the Hugging Face Hub dataset {HUB_ID!r}; needs a network connection "
        "(or a copy in the datasets cache) and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset.\n"
        "  - 'sample': 2,000 + 2,000 reviews shipped inside labutils (source='sample'); always "
        "available offline."
    )


# ----------------------------------------------------------------------------- schema


def _validate_table(table: pa.Table, origin: str) -> pa.Table:
    """Check that ``table`` has the hub schema and return just ``text`` (string), ``label`` (int64).

    Extra columns are dropped. Raises ``ValueError`` naming ``origin`` on missing columns, wrong
    types, nulls, or labels outside {0, 1}.
    """
    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{origin}: missing column(s) {missing}; found columns {table.column_names}. "
            "Expected the schema of stanfordnlp/imdb: 'text' (string) and 'label' (int, 0 = neg, "
            "1 = pos)."
        )
    text, label = table.column("text"), table.column("label")
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        raise ValueError(f"{origin}: column 'text' must hold strings, got type {text.type}.")
    if not pa.types.is_integer(label.type):
        raise ValueError(f"{origin}: column 'label' must hold integers 0/1, got type {label.type}.")
    for name, column in (("text", text), ("label", label)):
        if column.null_count:
            raise ValueError(f"{origin}: column {name!r} has {column.null_count} null value(s).")
    if len(label) and not set(pc.unique(label).to_pylist()) <= {0, 1}:
        bad = sorted(set(pc.unique(label).to_pylist()) - {0, 1})[:5]
        raise ValueError(f"{origin}: column 'label' must be 0 or 1, found values {bad}.")
    return table.select(["text", "label"]).cast(_ARROW_SCHEMA)


def _validate_dataset(dataset: datasets.Dataset, origin: str) -> datasets.Dataset:
    """Same checks as ``_validate_table`` for a ``datasets.Dataset`` (e.g. from the hub)."""
    missing = [c for c in ("text", "label") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{origin}: missing column(s) {missing}; found columns {dataset.column_names}."
        )
    extra = [c for c in dataset.column_names if c not in ("text", "label")]
    if extra:
        dataset = dataset.remove_columns(extra)
    _validate_table(dataset.data.table.slice(0, 0), origin)  # types only; the hub is trusted
    return dataset.cast(IMDB_FEATURES) if dataset.features != IMDB_FEATURES else dataset


# ----------------------------------------------------------------------------- sources


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _split_files(folder: Path, split: str) -> list[Path]:
    """``folder/split.parquet``, else the hub's shard names ``folder/split-*.parquet`` (sorted)."""
    single = folder / f"{split}.parquet"
    return [single] if single.is_file() else sorted(folder.glob(f"{split}-*.parquet"))


def _sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_parquet(path: Path) -> pa.Table:
    """``pq.read_table(path)``; an unreadable file (truncated, empty, not Parquet, no permission)
    raises DataSourceError naming the file and what pyarrow found wrong."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        size = path.stat().st_size if path.is_file() else None
        raise DataSourceError(
            f"{str(path)!r} ({size} bytes) cannot be read as Parquet: {str(err).rstrip('.')}. The file is truncated "
            "or corrupt: copy or download it again (the IMDb split files are tens of MB)."
        ) from None


def _dataset_from_parquet(files: Sequence[Path], split: str, source: str) -> datasets.Dataset:
    """Read and validate Parquet ``files`` into an in-memory Dataset.

    Its fingerprint is derived from the files' bytes, so tokenization caches stay valid across
    sessions and are invalidated when the files change.
    """
    tables = [_validate_table(_read_parquet(path), origin=str(path)) for path in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    fingerprint = f"imdb-{source}-{split}-{_sha256(files)[:32]}"
    info = datasets.DatasetInfo(features=IMDB_FEATURES)
    return datasets.Dataset(
        datasets.table.InMemoryTable(table),
        info=info,
        split=datasets.NamedSplit(split),
        fingerprint=fingerprint,
    )


def _load_local(split: str, data_dir: str | os.PathLike | None) -> datasets.Dataset:
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR) or None
    if data_dir is None:
        raise DataSourceError(
            _sources_help(
                f"source='local' needs a folder: pass data_dir=... or set {ENV_DATA_DIR}."
            )
        )
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataSourceError(_sources_help(f"IMDb folder {str(folder)!r} does not exist."))
    files = _split_files(folder, split)
    if not files:
        raise DataSourceError(
            _sources_help(
                f"IMDb folder {str(folder)!r} has no {split}.parquet "
                f"(nor {split}-*.parquet shards)."
            )
        )
    return _dataset_from_parquet(files, split, "local")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline_by_env() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for offline mode."""
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers one HEAD request within ``timeout`` seconds.

    Any HTTP answer (even 401/404) counts as reachable; DNS failures, refused connections and
    timeouts do not. No retries, and the answer is remembered for the session, so an offline
    machine pays at most ``timeout`` seconds once.
    """
    if hub_offline_by_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return _probe(f"{endpoint}/api/datasets/{HUB_ID}", timeout)


@functools.lru_cache(maxsize=8)
def _probe(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _load_hub(split: str, *, probe: bool = True) -> datasets.Dataset:
    """``stanfordnlp/imdb`` via ``datasets``; offline mode reads only the local datasets cache."""
    if probe and not hub_offline_by_env() and not hub_reachable():
        # Fail now: load_dataset would retry an unreachable host for about 25 seconds.
        raise DataSourceError(
            _sources_help(
                "The Hugging Face Hub is not reachable. (To use a copy already in the datasets "
                "cache, set HF_DATASETS_OFFLINE=1.)"
            )
        )
    try:
        dataset = datasets.load_dataset(HUB_ID, split=split)
    except Exception as err:  # network, auth, cache: all mean "this source is not available"
        raise DataSourceError(
            _sources_help(f"Could not load {HUB_ID!r} from the Hugging Face Hub: {err}")
        ) from err
    return _validate_dataset(dataset, origin=f"hub dataset {HUB_ID!r}")


def sample_dir() -> Path:
    """The folder of the embedded sample (``labutils/_data``)."""
    return Path(str(resources.files("labutils") / "_data"))


def _load_sample(split: str) -> datasets.Dataset:
    path = sample_dir() / _SAMPLE_FILE.format(split=split)
    if not path.is_file():
        raise DataSourceError(
            _sources_help(
                f"The embedded sample {str(path)!r} is missing: reinstall labutils or "
                "regenerate it "
                "with `python -m labutils.data make-sample --from DIR`."
            )
        )
    return _dataset_from_parquet([path], split, "sample")


# ----------------------------------------------------------------------------- rows


def _balanced_counts(n: int, labels: np.ndarray) -> tuple[int, int]:
    """Rows per class (neg, pos) for a balanced subset of ``n`` rows; the odd row goes to pos."""
    wanted = (n // 2, n - n // 2)
    for label, k in enumerate(wanted):
        available = int(np.sum(labels == label))
        if k > available:
            raise ValueError(
                f"sample={n} needs {k} {LABEL_NAMES[label]!r} reviews but this split has only "
                f"{available}; use sample <= {2 * min(np.sum(labels == 0), np.sum(labels == 1))}."
            )
    return wanted


def _stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (int64, sorted) of ``n`` rows, half per class, drawn without replacement."""
    picked = [
        rng.choice(np.flatnonzero(labels == label), size=k, replace=False)
        for label, k in enumerate(_balanced_counts(n, labels))
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _select_rows(
    dataset: datasets.Dataset, sample: int | None, seed: int, shuffle: bool
) -> datasets.Dataset:
    """Optionally a balanced subset of ``sample`` rows, then optionally a seeded shuffle."""
    if sample is None and not shuffle:
        return dataset
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.data.column("label").to_numpy())
    indices = np.arange(len(labels)) if sample is None else _stratified_indices(labels, sample, rng)
    if shuffle:
        indices = rng.permutation(indices)
    return dataset.select(indices)


def _check_load_args(split: str, source: str, sample: int | None, seed: int) -> None:
    _check_split(split)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} (or None for 'auto'), got {source!r}.")
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, int) or sample < 1
    ):
        raise ValueError(f"sample must be a positive int or None, got {sample!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")


def _load_source(
    split: str, source: str, data_dir: str | os.PathLike | None
) -> tuple[datasets.Dataset, str]:
    """The dataset of ``source`` (auto resolved) and the name of the source actually used."""
    if source == "local" or (source == "auto" and (data_dir or os.environ.get(ENV_DATA_DIR))):
        return _load_local(split, data_dir), "local"
    if source == "hub":
        return _load_hub(split), "hub"
    if source == "auto" and hub_reachable():
        try:
            return _load_hub(split, probe=False), "hub"
        except DataSourceError as err:
            warnings.warn(f"{err.__cause__!r}; using the embedded IMDb sample.", stacklevel=3)
    return _load_sample(split), "sample"


def load_imdb(
    split: str,
    *,
    source: str | None = None,
    data_dir: str | os.PathLike | None = None,
    sample: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> datasets.Dataset:
    """IMDb reviews of ``split`` ("train" or "test") as a ``datasets.Dataset``.

    Columns: ``text`` (str) and ``label`` (``ClassLabel(names=["neg", "pos"])``, stored int64).

    Args:
        split: "train" or "test".
        source: "auto" (default; also ``None``), "local", "hub" or "sample"; see the module
            docstring. ``data_dir`` or ``$LABBOOK_IMDB_DIR`` make "auto" mean "local".
        data_dir: folder with ``{split}.parquet`` (overrides ``$LABBOOK_IMDB_DIR``).
        sample: if given, a class-balanced subset of this many rows (drawn with ``seed``).
        seed: seeds the subset and the shuffle; the same arguments give the same rows.
        shuffle: return rows in a seeded random order (the sources are sorted by label).

    Returns:
        The dataset; ``dataset.info.description`` names the source that was used.

    Raises:
        DataSourceError: the requested source cannot be read (the message explains all three).
        ValueError: bad arguments, or a Parquet file without the ``text``/``label`` schema.
    """
    source = "auto" if source is None else source
    _check_load_args(split, source, sample, seed)
    if data_dir is not None and source not in ("auto", "local"):
        raise ValueError(f"data_dir is only used with source='local' or 'auto', not {source!r}.")
    dataset, used = _load_source(split, source, data_dir)
    dataset = _select_rows(dataset, sample, seed, shuffle)
    dataset.info.description = f"IMDb {split} split from source {used!r}: {len(dataset)} reviews"
    return dataset


# ----------------------------------------------------------------------------- tokenization


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where tokenized datasets are cached: ``path``, ``$LABBOOK_CACHE_DIR``, or
    ``$XDG_CACHE_HOME/labutils`` (default ``~/.cache/labutils``)."""
    if path is None:
        path = os.environ.get(ENV_CACHE_DIR) or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labutils"
        )
    return Path(path).expanduser()


def _tokenization_key(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int, padding: bool
) -> str:
    """Cache key from the data fingerprint, the tokenizer's identity and the settings."""
    recipe = {
        "data": dataset._fingerprint,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "max_length": max_length,
        "padding": padding,
        "version": _TOKENIZED_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]


def _encode_batch(
    batch: dict[str, list], *, tokenizer: Any, max_length: int, padding: bool
) -> dict:
    """Token ids and attention masks for a batch of reviews, truncated to ``max_length``."""
    encoded = tokenizer(
        batch["text"],
        truncation=True,
        max_length=max_length,
        padding="max_length" if padding else False,
        return_token_type_ids=False,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def tokenize_imdb(
    dataset: datasets.Dataset,
    tokenizer: Any,
    max_length: int = 256,
    *,
    padding: bool = True,
    batch_size: int = 1000,
    cache: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Tokenize ``dataset["text"]`` once; later calls load the result from disk.

    The cache file is ``cache_dir(cache)/tokenized/imdb-<key>.arrow`` where the key hashes the
    dataset's fingerprint, the tokenizer's name, class and vocabulary size, ``max_length`` and
    ``padding``.

    Returns:
        A dataset in torch format with ``input_ids`` and ``attention_mask`` (int64; shape
        ``[max_length]`` per row when ``padding``, else up to ``max_length``) and ``label``
        (int64 scalar). ``dataset[i:j]["input_ids"]`` is a ``[j - i, max_length]`` tensor.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}.")
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer)}."
        )
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset has no 'text' column; found {dataset.column_names}.")
    key = _tokenization_key(dataset, tokenizer, max_length, padding)
    path = cache_dir(cache) / "tokenized" / f"imdb-{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = functools.partial(
        _encode_batch, tokenizer=tokenizer, max_length=max_length, padding=padding
    )
    tokenized = dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        cache_file_name=str(path),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=f"Tokenizing (max_length={max_length})",
    )
    return tokenized.with_format("torch", columns=["input_ids", "attention_mask", "label"])


# ----------------------------------------------------------------------------- the embedded sample


@dataclass(frozen=True)
class SampleSpec:
    """How the embedded sample is drawn: ``n_per_class`` reviews of each label per split."""

    n_per_class: int = 1000
    seed: int = 0
    zstd_level: int = 19


def _write_parquet(table: pa.Table, path: Path, zstd_level: int) -> None:
    """Write ``table`` so that the same table gives the same bytes (no timestamps, fixed codec)."""
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=zstd_level,
        use_dictionary=False,
        write_statistics=False,
        store_schema=False,
    )


def _draw_sample_split(
    table: pa.Table, eligible: np.ndarray, spec: SampleSpec, split_number: int
) -> pa.Table:
    """A balanced, shuffled subset of the ``eligible`` rows (bool mask) of ``table``; each split
    gets its own seeded stream."""
    rng = np.random.default_rng([spec.seed, split_number])
    labels = np.where(eligible, table.column("label").to_numpy(), -1)  # -1 is never drawn
    indices = rng.permutation(_stratified_indices(labels, 2 * spec.n_per_class, rng))
    return table.take(pa.array(indices))


def _unique_text_masks(tables: Sequence[pa.Table]) -> list[np.ndarray]:
    """Per table, which rows hold a text that occurs exactly once across all ``tables``.

    The full IMDb repeats some reviews (within a split and across train/test); leaving them out
    keeps the sample free of duplicates and of train/test leakage."""
    texts = pa.chunked_array([chunk for t in tables for chunk in t.column("text").chunks])
    counts = pc.value_counts(texts)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return [
        np.logical_not(
            pc.is_in(t.column("text"), value_set=repeated).to_numpy(zero_copy_only=False)
        )
        for t in tables
    ]


def make_imdb_sample(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    n_per_split_per_class: int = 1000,
    seed: int = 0,
) -> dict:
    """Draw the embedded sample from the full set and write it, with its provenance.

    Reads ``source_dir/{train,test}.parquet``; writes ``out_dir/imdb_{train,test}.parquet``
    (zstd, ``2 * n_per_split_per_class`` rows each, balanced, shuffled) and
    ``out_dir/imdb_sample.json`` (source and output sha256, seed, counts). Reviews whose text
    occurs more than once in train + test are never drawn. ``out_dir`` defaults
    to the package's ``_data`` folder. Deterministic: the same inputs give the same bytes.

    Returns:
        The provenance dict that was written.
    """
    spec = SampleSpec(n_per_class=n_per_split_per_class, seed=seed)
    if (
        isinstance(spec.n_per_class, bool)
        or not isinstance(spec.n_per_class, int)
        or spec.n_per_class < 1
    ):
        raise ValueError(
            f"n_per_split_per_class must be a positive int, got {n_per_split_per_class!r}."
        )
    source, out = Path(source_dir), Path(out_dir) if out_dir is not None else sample_dir()
    out.mkdir(parents=True, exist_ok=True)
    provenance: dict[str, Any] = {
        "dataset": "IMDb Large Movie Review Dataset v1.0 (Maas et al., 2011), "
        "schema of stanfordnlp/imdb",
        "seed": seed,
        "n_per_split_per_class": n_per_split_per_class,
        "pyarrow_version": pa.__version__,
        "regenerate": "python -m labutils.data make-sample --from DIR",
        "splits": {},
    }
    sources = [source / f"{split}.parquet" for split in SPLITS]
    for src in sources:
        if not src.is_file():
            raise DataSourceError(_sources_help(f"make-sample: {str(src)!r} does not exist."))
    tables = [_validate_table(_read_parquet(src), origin=str(src)) for src in sources]
    for split_number, (split, src, table, eligible) in enumerate(
        zip(SPLITS, sources, tables, _unique_text_masks(tables), strict=True)
    ):
        subset = _draw_sample_split(table, eligible, spec, split_number)
        dst = out / _SAMPLE_FILE.format(split=split)
        _write_parquet(subset, dst, spec.zstd_level)
        labels = subset.column("label").to_numpy()
        provenance["splits"][split] = {
            "source_file": src.name,
            "source_sha256": _sha256([src]),
            "source_rows": table.num_rows,
            "source_rows_with_repeated_text_excluded": int(np.sum(~eligible)),
            "file": dst.name,
            "sha256": _sha256([dst]),
            "bytes": dst.stat().st_size,
            "rows": subset.num_rows,
            "rows_per_label": {
                name: int(np.sum(labels == i)) for i, name in enumerate(LABEL_NAMES)
            },
        }
    (out / _SAMPLE_PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return provenance


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labutils.data make-sample --from DIR [--out DIR] [--per-class N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m labutils.data", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-sample", help="regenerate the embedded IMDb sample")
    make.add_argument(
        "--from", dest="source_dir", required=True, help="folder with train.parquet, test.parquet"
    )
    make.add_argument(
        "--out", dest="out_dir", default=None, help="output folder (default: labutils/_data)"
    )
    make.add_argument(
        "--per-class", type=int, default=SampleSpec.n_per_class, help="reviews per label per split"
    )
    make.add_argument("--seed", type=int, default=SampleSpec.seed)
    args = parser.parse_args(argv)
    provenance = make_imdb_sample(args.source_dir, args.out_dir, args.per_class, args.seed)
    for split, entry in provenance["splits"].items():
        print(
            f"{split}: {entry['rows']} rows {entry['rows_per_label']} -> {entry['file']} "
            f"({entry['bytes']:,} bytes, sha256 {entry['sha256'][:16]}...)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
