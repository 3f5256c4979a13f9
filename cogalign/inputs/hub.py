"""Hub dataset inputs: `hf://datasets/OWNER/NAME[@REVISION][/PATH]` through huggingface_hub.

- The revision (default `main`; one holding `/`, like `refs/pr/1`, is written URL-encoded:
  `@refs%2Fpr%2F1`) is resolved to its commit sha (`HfApi.dataset_info`), which pins the
  input: the manifest records it and a resume checks it.
- The config and split are chosen among the repo's parquet files by `datasets`' rules
  (`cogalign.inputs.splits`); PATH narrows the repo to a folder or one parquet file (the
  card's `configs` then do not apply).
- Nothing is downloaded up front: a file's row count comes from its parquet footer (a few
  ranged reads through `HfFileSystem`), and a file is downloaded (`hf_hub_download`, into the
  standard cache) only when a record this run or slice handles lives in it.
- `HF_HUB_OFFLINE=1` reads the cache alone (`refs/REVISION` -> `snapshots/SHA/...`); `HF_HUB_CACHE`,
  `HF_HOME` and `HF_ENDPOINT` are read when the input is opened. See docs/hub-input.md.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote

from cogalign.errors import InputError

__all__ = ["DatasetSpec", "HubFile", "is_hub_input", "parse", "resolve", "repo_folder", "PREFIX"]

PREFIX = "hf://datasets/"
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `hf://datasets/OWNER/NAME[@REV][/PATH]`: repo id, revision (None: the default branch), path in
    the repo."""
    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        from cogalign.tokenizers.hub import spec_text

        return spec_text(PREFIX, self.repo_id, self.revision, self.path)


def is_hub_input(spec) -> bool:
    """True for an `hf://` spec string."""
    return isinstance(spec, str) and spec.startswith("hf://")


def parse(spec: str) -> DatasetSpec:
    """`hf://datasets/OWNER/NAME[@REVISION][/PATH]`; the revision is URL-decoded."""
    if not spec.startswith(PREFIX):
        rest = spec[len("hf://"):]
        raise InputError(f"{spec}: an input from the Hub is a dataset repo; write hf://datasets/{rest or 'OWNER/NAME'}")
    parts = spec[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2 or any(not p or p in (".", "..") for p in parts):
        raise InputError(f"{spec}: write hf://datasets/OWNER/NAME, hf://datasets/OWNER/NAME@REVISION or "
                         "hf://datasets/OWNER/NAME/PATH")
    name, at, revision = parts[1].partition("@")
    revision = unquote(revision)
    if at and not revision:
        raise InputError(f"{spec}: empty revision; write hf://datasets/OWNER/NAME@REVISION (a revision with "
                         "'/' URL-encoded: @refs%2Fpr%2F1)")
    from cogalign.tokenizers.hub import check_repo_id

    repo_id = f"{parts[0]}/{name}"
    check_repo_id(repo_id, spec, InputError)
    return DatasetSpec(repo_id, revision or None, "/".join(parts[2:]))


def _env():
    from cogalign.tokenizers.hub import hub_cache_dir, hub_offline

    return hub_cache_dir(), hub_offline(), os.environ.get("HF_ENDPOINT") or None


def _offline_hint(cache: Path) -> str:
    return (f"HF_HUB_OFFLINE=1 is set, so only the cache {cache} is used; unset it to download, or set "
            "HF_HUB_CACHE/HF_HOME to the cache that holds it")


@dataclass(frozen=True)
class HubFile:
    """One parquet file of a pinned commit; downloaded on first `local()`."""

    repo_id: str
    commit: str
    name: str  # path in the repo
    size: int

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}@{self.commit[:12]}/{self.name}"

    def cached(self) -> Path | None:
        """The file's path in the Hugging Face cache, or None when it is not there yet."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, self.name, cache_dir=_env()[0], revision=self.commit,
                                       repo_type="dataset")
        return Path(found) if isinstance(found, str) else None

    def local(self) -> Path:
        """The file on disk: downloaded into the Hugging Face cache on first call (cache only when offline)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        cache, offline, endpoint = _env()
        try:
            return Path(hf_hub_download(self.repo_id, self.name, repo_type="dataset", revision=self.commit,
                                        cache_dir=cache, endpoint=endpoint, local_files_only=offline))
        except LocalEntryNotFoundError:
            raise InputError(f"{self}: not in the Hugging Face cache; {_offline_hint(cache) if offline else 'the Hub cannot be reached'}") from None
        except (HfHubHTTPError, OSError) as exc:
            raise InputError(f"{self}: download failed ({' '.join(str(exc).split())[:160]}); rerun to resume") from None

    @cached_property
    def num_rows(self) -> int:
        """From the parquet footer: the cached file's, else a ranged read on the Hub (no download)."""
        import pyarrow.parquet as pq

        local = self.cached()
        cache, offline, endpoint = _env()
        try:
            if local is not None:
                return pq.ParquetFile(local).metadata.num_rows
            if offline:
                raise InputError(f"{self}: not in the Hugging Face cache; {_offline_hint(cache)}")
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem(endpoint=endpoint)
            with fs.open(f"datasets/{self.repo_id}@{self.commit}/{self.name}", "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        except InputError:
            raise
        except Exception as exc:  # pyarrow, fsspec and HTTP errors alike
            raise InputError(f"{self}: cannot read its parquet footer ({' '.join(str(exc).split())[:160]})") from None


def _from_hub(ds: DatasetSpec, endpoint: str | None) -> tuple[str, dict[str, int]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        info = HfApi(endpoint=endpoint).dataset_info(ds.repo_id, revision=ds.revision, files_metadata=True)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise InputError(f"{ds}: dataset repo not found or not accessible ({type(exc).__name__}); check the name, "
                         "or log in with `hf auth login` for a private or gated repo") from None
    except RevisionNotFoundError:
        raise InputError(f"{ds}: revision {ds.revision!r} does not exist in {ds.repo_id} (a revision with '/' "
                         "is written URL-encoded: @refs%2Fpr%2F1)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise InputError(f"{ds}: the Hub cannot be reached ({' '.join(str(exc).split())[:160]}); retry, or set "
                         "HF_HUB_OFFLINE=1 to use the cache") from None
    except Exception as exc:  # httpx transport errors (huggingface_hub >= 1.0)
        if type(exc).__module__.startswith(("httpx", "requests")):
            raise InputError(f"{ds}: the Hub cannot be reached ({type(exc).__name__}); retry, or set "
                             "HF_HUB_OFFLINE=1 to use the cache") from None
        raise
    return info.sha, {s.rfilename: int(s.size or 0) for s in info.siblings or ()}


def repo_folder(cache: Path, repo_id: str) -> Path:
    """The cache folder of dataset `repo_id` under `cache` (huggingface_hub's `datasets--OWNER--NAME`)."""
    return cache / ("datasets--" + repo_id.replace("/", "--"))


def _from_cache(ds: DatasetSpec, cache: Path) -> tuple[str, dict[str, int]]:
    """The commit and files of a cached snapshot (huggingface_hub's layout: refs/REV, snapshots/SHA/...)."""
    repo = repo_folder(cache, ds.repo_id)
    if not repo.is_dir():
        raise InputError(f"{ds}: not in the Hugging Face cache; {_offline_hint(cache)}")
    rev = ds.revision or "main"
    if _SHA.fullmatch(rev) and (repo / "snapshots" / rev).is_dir():
        commit = rev
    else:
        ref = repo / "refs" / rev
        if not ref.is_file():
            known = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
            raise InputError(f"{ds}: revision {rev!r} is not in the cache (cached: {', '.join(known) or 'none'}); "
                             + _offline_hint(cache))
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise InputError(f"{ds}: the cache names commit {commit[:12]} but holds no snapshot of it; {_offline_hint(cache)}")
    files = {f.relative_to(snapshot).as_posix(): f.stat().st_size for f in snapshot.rglob("*") if f.is_file()}
    return commit, files


def _card(ds: DatasetSpec, commit: str, files: dict[str, int]) -> dict | None:
    if "README.md" not in files:
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(HubFile(ds.repo_id, commit, "README.md", files["README.md"]).local())
    except Exception as exc:  # a card that is not YAML: datasets would fail on it too
        raise InputError(f"{ds}: its README.md card has no readable YAML ({' '.join(str(exc).split())[:160]})") from None


def resolve(spec: str, config: str | None, split: str | None):
    """The `DatasetInput` of one config and split of a Hub dataset, at a pinned commit."""
    from cogalign.inputs.splits import DatasetInput, choose, missing_shards

    ds = parse(spec)
    cache, offline, endpoint = _env()
    commit, files = _from_cache(ds, cache) if offline else _from_hub(ds, endpoint)
    if ds.path.endswith(".parquet"):
        if ds.path not in files:
            raise InputError(f"{ds}: no file {ds.path!r} at commit {commit[:12]}")
        if config or split:
            raise InputError(f"{ds}: one parquet file has no configs or splits; leave out --config/--split")
        names, config, split = [ds.path], "default", ""
    else:
        prefix = f"{ds.path}/" if ds.path else ""
        below = [n[len(prefix):] for n in files if n.startswith(prefix)]
        if ds.path and not below:
            raise InputError(f"{ds}: no folder {ds.path!r} at commit {commit[:12]}")
        card = None if ds.path else _card(ds, commit, files)
        config, split, chosen = choose(below, card, config, split, str(ds))
        names = [prefix + n for n in chosen]
        if offline:  # the cache holds only the files once downloaded
            missing_shards(names, split, str(ds), f"{_offline_hint(cache)}, or name the files you have with /PATH")
    snapshot = repo_folder(cache, ds.repo_id) / "snapshots" / commit
    return DatasetInput(label=str(ds), config=config, split=split,
                        files=tuple(HubFile(ds.repo_id, commit, n, files[n]) for n in names),
                        root=(snapshot / ds.path).parent if ds.path.endswith(".parquet") else snapshot / ds.path,
                        hub={"repo": ds.repo_id, "revision": ds.revision or "main", "commit": commit})
