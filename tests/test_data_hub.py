"""Hub datasets (data.path + data.subset / data.revision / data.split, data.streaming refused), tested offline
through a local directory laid out as a hub dataset repository: a README.md whose YAML header lists the subsets
(``configs``) and their split files, under git so that a revision can be pinned."""

import json
import subprocess

import pytest

from gemma4vl.data.sources import load_source

README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: validation
    path: en/validation.jsonl
- config_name: fr
  data_files:
  - split: train
    path: fr/train.jsonl
---
# a tiny VQA set
"""


def _rows(path, answers):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {a}"},
                                                     {"role": "assistant", "content": a}]}) + "\n" for a in answers))


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """Commit v1: en/train 4 rows, en/validation 1, fr/train 2; commit v2 (HEAD): en/train 6 rows."""
    repo = tmp_path_factory.mktemp("hub") / "owner--vqa"
    repo.mkdir()
    (repo / "README.md").write_text(README)
    _rows(repo / "en" / "train.jsonl", ["a1", "a2", "a3", "a4"])
    _rows(repo / "en" / "validation.jsonl", ["v1"])
    _rows(repo / "fr" / "train.jsonl", ["oui", "non"])
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "v1")
    _git(repo, "tag", "v1")
    _rows(repo / "en" / "train.jsonl", ["a1", "a2", "a3", "a4", "a5", "a6"])
    _git(repo, "commit", "-qam", "v2")
    return repo


def answers(source):
    return [row["messages"][1]["content"] for row in source.dataset]


def test_subset_and_split_selection(hub_repo, tmp_path):
    cache = str(tmp_path / "cache")
    assert answers(load_source(str(hub_repo), "train", subset="fr", cache_dir=cache)) == ["oui", "non"]
    assert answers(load_source(str(hub_repo), "train", subset="en", cache_dir=cache)) == [
        "a1", "a2", "a3", "a4", "a5", "a6"]
    assert answers(load_source(str(hub_repo), "validation", subset="en", cache_dir=cache)) == ["v1"]
    # datasets' split slicing: a held-out tail of train
    assert answers(load_source(str(hub_repo), "train[:50%]", subset="en", cache_dir=cache)) == ["a1", "a2", "a3"]
    assert answers(load_source(str(hub_repo), "train[4:]", subset="en", cache_dir=cache)) == ["a5", "a6"]
    with pytest.raises(ValueError, match=r"subset 'de' .*BuilderConfig 'de' not found. Available: \['en', 'fr'\]"):
        load_source(str(hub_repo), "train", subset="de", cache_dir=cache)


def test_revision_pins_the_repository_state(hub_repo, tmp_path):
    cache = tmp_path / "cache"
    old = load_source(str(hub_repo), "train", subset="en", revision="v1", cache_dir=str(cache))
    assert answers(old) == ["a1", "a2", "a3", "a4"]
    head = load_source(str(hub_repo), "train", subset="en", revision="HEAD", cache_dir=str(cache))
    assert answers(head) == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert old.fingerprint != head.fingerprint  # the packing plan cache tells the revisions apart
    commit = _git(hub_repo, "rev-parse", "v1")
    assert sorted(p.name for p in (cache / "revisions").iterdir()) == sorted({commit, _git(hub_repo, "rev-parse", "HEAD")})
    with pytest.raises(ValueError, match=r"data.revision='v9': no such commit, branch or tag"):
        load_source(str(hub_repo), "train", subset="en", revision="v9", cache_dir=str(cache))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text(README)
    with pytest.raises(ValueError, match=r"data.revision='v1': the dataset directory .*plain is not a git repository"):
        load_source(str(plain), "train", subset="en", revision="v1")


def test_streaming_is_refused_with_the_reason():
    from gemma4vl.data.config import Gemma4VLDataConfig

    cfg = Gemma4VLDataConfig(processor_path="unused", path="owner/name", streaming=True)
    with pytest.raises(ValueError, match=r"data.streaming=true is not supported: the packing plan measures every "
                                         r"row's length"):
        cfg.pipeline("train")
