"""Data sources through the ``datasets`` library: local files and directories, ``save_to_disk`` output, hub names.

Every source ends up a map-style, Arrow-backed (memory-mapped) ``datasets.Dataset``: rows are read one at a time
(:class:`RowReader`, undecoded: images stay bytes / paths), so memory does not grow with the dataset.

``path`` may be:

- a file ``*.json`` / ``*.jsonl`` / ``*.parquet`` / ``*.arrow``: loaded as the requested split;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a directory of such files: splits from file names as ``datasets`` names them (``train*.jsonl``,
  ``validation*.parquet``, ``val``/``dev``/``test``...; a directory without split names is all "train"); only
  json/parquet/arrow files count (an ``images/`` folder next to them is fine), hidden files / directories are
  ignored;
- otherwise a hub dataset name (``owner/name``), loaded with ``datasets.load_dataset(name, split=...)``.

Relative image paths resolve against ``image_root``: by default the file's directory / the directory itself
(hub datasets have none; set it if their rows hold relative paths).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclasses.dataclass
class Source:
    """One split of a dataset, ready to be read row by row."""

    dataset: Any  # datasets.Dataset
    name: str  # "path [split]", used in messages
    image_root: str | None
    fingerprint: str  # changes when the data changes (keys cached packing plans)
    local_dir: str | None  # where a plan cache may live by default (None for hub datasets)
    skipped_lines: list[str] = dataclasses.field(default_factory=list)  # JSONL lines that are not JSON (skip policy)

    def __len__(self) -> int:
        return len(self.dataset)


def _disable_image_decoding(feature: Any) -> None:
    """Set ``decode=False`` on every ``datasets.Image`` inside ``feature`` (in place)."""
    import datasets

    if isinstance(feature, datasets.Image):
        feature.decode = False
    elif isinstance(feature, dict):
        for sub in feature.values():
            _disable_image_decoding(sub)
    elif isinstance(feature, (list, tuple)):
        for sub in feature:
            _disable_image_decoding(sub)
    elif hasattr(feature, "feature"):  # List / LargeList / Sequence
        _disable_image_decoding(feature.feature)


class RowReader:
    """Rows of a ``datasets.Dataset`` as plain Python values, decoded by their features (e.g. ``Json``) except
    images, which stay as stored (``{"bytes", "path"}``, paths): they are opened later, safely."""

    def __init__(self, dataset, columns: list[str] | None = None):
        if columns is not None:
            present = [c for c in columns if c in dataset.column_names]
            dataset = dataset.select_columns(present)
        self._features = copy.deepcopy(dataset.features)
        _disable_image_decoding(self._features)
        self._arrow = dataset.with_format("arrow")
        self._len = len(dataset)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(f"row {index} out of range for {self._len} rows")
        return self._features.decode_example(self._arrow[int(index)].to_pylist()[0])


def _looks_local(path: str) -> bool:
    """Not a hub name (``name`` or ``owner/name``): a data-file suffix, an absolute / explicit relative path, or
    more than one ``/``."""
    return (Path(path).suffix.lower() in BUILDERS or path.startswith(("/", "./", "../", "~"))
            or os.sep + "." in path or path.count("/") > 1)


def _split_of(relative: str) -> str | None:
    """The split a data file belongs to by its path, as ``datasets`` names splits (train / validation / test and
    their aliases, delimited by - . _ space digits or /)."""
    from datasets.data_files import SPLIT_KEYWORDS

    lowered = relative.lower()
    for split, keywords in SPLIT_KEYWORDS.items():
        for keyword in keywords:
            if re.search(rf"(^|[-._ 0-9/]){keyword}([-._ 0-9/]|$)", lowered):
                return str(split)
    return None


def _split_files(directory: Path) -> dict[str, list[str]]:
    """Data files (json/jsonl/parquet/arrow, not hidden) below ``directory`` grouped by split; all "train" when no
    file name names a split."""
    found = []
    for here, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if not f.startswith((".", "__")) and Path(f).suffix.lower() in BUILDERS:
                found.append(os.path.relpath(os.path.join(here, f), directory))
    named = {rel: _split_of(rel) for rel in found}
    out: dict[str, list[str]] = {}
    if not any(named.values()):
        return {"train": [str(directory / rel) for rel in sorted(found)]} if found else {}
    for rel, split in sorted(named.items()):
        if split is not None:
            out.setdefault(split, []).append(str(directory / rel))
    return out


def _bad_jsonl_lines(files: list[str]) -> list[str]:
    """``file:line: error`` for every non-blank line of the ``.jsonl`` files that is not a JSON object."""
    bad = []
    for f in files:
        if Path(f).suffix.lower() == ".jsonl":
            st = os.stat(f)
            bad += _bad_lines_of(f, st.st_size, st.st_mtime_ns)
    return bad


@functools.lru_cache(maxsize=64)
def _bad_lines_of(path: str, size: int, mtime_ns: int) -> list[str]:
    """One file's scan, cached per (path, size, mtime): the run's pre-flight check and the dataset provider load
    the same files in one process, and the scan parses every line."""
    import json

    bad = []
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                bad.append(f"{path}:{number}: not valid JSON ({e})")
                continue
            if not isinstance(value, dict):
                bad.append(f"{path}:{number}: a JSON {type(value).__name__}, expected an object (one row per line)")
    return bad


def _good_jsonl_rows(files: list[str], stamp: str):
    """Rows of the ``.jsonl`` files, skipping the lines :func:`_bad_jsonl_lines` reports (``stamp`` keys the
    ``datasets`` cache to the files' sizes and times)."""
    import json

    for f in files:
        with open(f, "rb") as fh:
            for line in fh:
                if line.strip():
                    try:
                        value = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(value, dict):
                        yield value


def _load_files(builder: str, files: list[str], split: str, hf_cache: str | None, bad_rows: str):
    """``datasets.load_dataset(builder, ...)`` over ``files``, after checking JSONL lines: a line that is not a
    JSON object is an error naming file and line (``bad_rows="error"``) or is skipped and reported
    (``"skip"``: the rows are then read through ``Dataset.from_generator``)."""
    import datasets

    bad = _bad_jsonl_lines(files) if builder == "json" else []
    if bad and bad_rows == "error":
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"{len(bad)} line(s) of the data are not JSON rows: {'; '.join(bad[:3])}{more}. Fix them, "
                         "or set data.bad_rows=skip to skip them (they count towards data.max_skipped_fraction)")
    if not any(os.path.getsize(f) for f in files):
        raise ValueError(f"the data files {files} are empty (no rows)")
    if bad:
        stamp = "|".join(f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
        ds = datasets.Dataset.from_generator(_good_jsonl_rows, gen_kwargs={"files": files, "stamp": stamp},
                                             cache_dir=hf_cache)
    else:
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, cache_dir=hf_cache)
    return ds, bad


def _builder(files: list[str], where: str) -> str:
    kinds = {BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(kinds) != 1:
        raise ValueError(f"{where} mixes file types {sorted(kinds)}; use one of json/jsonl, parquet, arrow per split")
    return kinds.pop()


def _fingerprint(dataset, extra: str) -> str:
    h = hashlib.sha256()
    h.update(f"{getattr(dataset, '_fingerprint', '')}|{len(dataset)}|{dataset.column_names}|{extra}".encode())
    for f in dataset.cache_files:
        st = os.stat(f["filename"])
        h.update(f"{f['filename']}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _checkout(repo: Path, revision: str, cache_dir: str | None) -> Path:
    """The files of ``revision`` of the local git repository ``repo`` (a clone of a hub dataset repository), in
    ``<cache_dir or repo/.gemma4vl_cache>/revisions/<commit>`` (written whole: into a temporary directory renamed
    into place). ``datasets`` ignores ``revision`` for a local directory, hence this."""
    import shutil
    import subprocess
    import tarfile
    import tempfile

    if not (repo / ".git").exists():
        raise ValueError(f"data.revision={revision!r}: the dataset directory {repo} is not a git repository (clone "
                         "the hub dataset repository with git to pin a revision, or leave data.revision null)")
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise ValueError(f"data.revision={revision!r}: no such commit, branch or tag in the git repository {repo}")
    commit = found.stdout.strip()
    base = Path(cache_dir).expanduser() if cache_dir is not None else repo / ".gemma4vl_cache"
    dest = base / "revisions" / commit
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{commit}."))
        try:
            archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit],
                                     capture_output=True, check=True)
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(tmp, filter="data")
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.is_dir():  # another process placed the same commit first: use that one
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_hub(path: str, subset: str | None, revision: str | None, split: str, hf_cache: str | None):
    """One split of a hub dataset repository (a hub name, or a local directory laid out as one)."""
    import datasets

    try:
        return datasets.load_dataset(path, name=subset, revision=revision, split=split, cache_dir=hf_cache)
    except Exception as e:  # noqa: BLE001 - offline, unknown name / subset / revision, gated, missing split ...
        raise ValueError(f"could not load hub dataset {path!r} subset {subset!r} revision {revision!r} split "
                         f"{split!r}: {type(e).__name__}: {e}") from e


def load_source(path: str, split: str, *, image_root: str | None = None, cache_dir: str | None = None,
                max_rows: int | None = None, bad_rows: str = "error", subset: str | None = None,
                revision: str | None = None) -> Source:
    """Load one split of ``path`` (see the module docstring); raises with the path and what was expected.
    JSONL lines that are not JSON objects are an error naming file and line, or skipped under
    ``bad_rows="skip"`` (listed in ``Source.skipped_lines``)."""
    import datasets

    local = Path(path).expanduser()
    name = f"{path} [{split}]" if subset is None else f"{path} ({subset}) [{split}]"
    skipped: list[str] = []
    hf_cache = str(Path(cache_dir).expanduser() / "hf_datasets") if cache_dir is not None else None
    hub = subset is not None or revision is not None
    if hub and local.is_file():
        raise ValueError(f"data.subset / data.revision need a hub dataset repository (a hub name or a directory laid "
                         f"out as one), not the file {path}")
    if hub and local.is_dir():
        repo = local.resolve() if revision is None else _checkout(local.resolve(), revision, cache_dir)
        ds = _load_hub(str(repo), subset, None, split, hf_cache)
        default_root, local_dir = local.resolve(), local.resolve()
    elif local.is_file():
        suffix = local.suffix.lower()
        if suffix not in BUILDERS:
            raise ValueError(f"dataset file {local} has suffix {suffix!r}; expected one of {sorted(BUILDERS)}")
        ds, skipped = _load_files(BUILDERS[suffix], [str(local.resolve())], split, hf_cache, bad_rows)
        default_root, local_dir = local.resolve().parent, local.resolve().parent
    elif local.is_dir():
        root = local.resolve()
        if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{root} (save_to_disk DatasetDict) has splits {sorted(loaded)}, not {split!r}")
                ds = loaded[split]
            else:
                ds = loaded
        else:
            files = _split_files(root)
            if not files:
                raise ValueError(f"directory {root} holds no dataset files ({', '.join(sorted(BUILDERS))}) and is "
                                 "not a save_to_disk directory")
            if split not in files:
                raise ValueError(f"directory {root} has splits {sorted(files)} (from file names), not {split!r}")
            ds, skipped = _load_files(_builder(files[split], f"split {split!r} of {root}"), files[split], split,
                                      hf_cache, bad_rows)
        default_root, local_dir = root, root
    elif _looks_local(path):
        raise FileNotFoundError(f"dataset path {path} does not exist (expected a file, a directory, or a hub name "
                                "like owner/name)")
    else:
        ds = _load_hub(path, subset, revision, split, hf_cache)
        default_root, local_dir = None, None
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{name}: expected a map-style datasets.Dataset, got {type(ds).__name__}")
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max rows must be >= 1, got {max_rows}")
        ds = ds.select(range(min(max_rows, len(ds))))
    root = str(Path(image_root).expanduser().resolve()) if image_root is not None else (
        str(default_root) if default_root is not None else None)
    return Source(ds, name, root, _fingerprint(ds, f"{path}|{subset}|{revision}|{split}|{max_rows}"),
                  str(local_dir) if local_dir is not None else None, skipped)
