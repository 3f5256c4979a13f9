"""`cogalign publish`: upload a finished output folder to a Hugging Face dataset repository.

Only `data/`, `README.md` (the dataset card) and `report.json` go up, unless
`include_all`. The card is cogalign's, made again from report.json and the manifest with
`license`; a README.md of the user's that `expand` kept goes up only with `card="yours"`
(`card="ours"` uploads cogalign's card in its place, and leaves the local file alone). The plan is checked and printed before any network call; the token
and the endpoint are checked before the repository is created, so a failure leaves
nothing half-done on the Hub. The upload resumes: rerunning skips committed files.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cogalign.errors import CogalignError
from cogalign.hub.output import check_complete
from cogalign.expand.layout import CARD, card_is_ours, write_card

__all__ = ["PublishPlan", "plan_publish", "publish", "resumable", "STALE"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_NEVER = (".partial", ".git", ".cache")  # never uploaded, even with include_all
STALE = "data/*"  # remote files here that this upload does not write are deleted


@dataclass(frozen=True)
class PublishPlan:
    """What `publish` will upload: the files with their sizes, the repo, revision and endpoint, the card, and
    notes to print."""
    folder: Path
    repo_id: str
    revision: str | None
    private: bool
    endpoint: str
    files: tuple[tuple[str, int], ...]  # (path in the repo, size in bytes)
    card: bytes | None = None  # what goes up as README.md (cogalign's card); None: the local README.md as it is
    card_is_local: bool = True  # README.md is cogalign's: `card` is written to it (and stats/card.md) first
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Bytes of all files to upload."""
        return sum(size for _, size in self.files)

    @property
    def url(self) -> str:
        """The dataset's page on the Hub."""
        return f"{self.endpoint.rstrip('/')}/datasets/{self.repo_id}"

    def lines(self) -> list[str]:
        """The plan as printed: target, each file and its size, totals, what is deleted remotely."""
        width = max(len(path) for path, _ in self.files)
        head = [f"target: {self.url} (dataset, {'private' if self.private else 'public'}, "
                f"revision {self.revision or 'main'})"]
        return head + [f"  {path:<{width}}  {size:>12,} B" for path, size in self.files] + [
            f"{len(self.files)} files, {self.total_bytes:,} B",
            f"remote files under {STALE.rstrip('*')} that are not listed here are deleted (an earlier run's shards)"]


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the Hub's ids: cc-by-4.0, apache-2.0, gpl-3.0+, other


def plan_publish(out: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                 include_all: bool = False, card: str | None = None, license: str | None = None) -> PublishPlan:
    """What would be uploaded where; refuses an incomplete output or a bad repository name."""
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise CogalignError(f"--repo {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.'), "
                            "e.g. my-org/llava-cogalign")
    if revision is not None and not revision.strip():
        raise CogalignError("--revision is empty; give a branch name or leave it out for main")
    if license is not None and not _LICENSE.fullmatch(license):
        raise CogalignError(f"--license {license!r}: expected a Hub license id (lowercase letters, digits, '.', '-'), "
                            "e.g. cc-by-4.0, apache-2.0, mit, other")
    layout = check_complete(out)
    root = layout.root
    _check_not_empty(root)
    if include_all:
        paths = [p for p in sorted(root.rglob("*")) if p.is_file()
                 and not any(part in _NEVER for part in p.relative_to(root).parts) and not p.name.endswith(".tmp")]
    else:
        paths = [layout.shard_path(i) for i in range(layout.num_shards)] + [root / "README.md", root / "report.json"]
    files = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in paths]
    text, local, notes = _card(root, card, license)
    if text is not None:
        files = [(path, len(text) if path == CARD else size) for path, size in files]
    return PublishPlan(root, repo_id, revision, private, _endpoint(), tuple(files), text, local, tuple(notes))


def _check_not_empty(root: Path) -> None:
    """Refuse an output that kept no record: publishing it would replace the repo's shards with an empty one."""
    from cogalign.inputs.records import loads_exact
    from cogalign.expand.report import top_reasons

    report = loads_exact((root / "report.json").read_bytes())
    if report.get("expanded", 0) + report.get("passed", 0) == 0:
        raise CogalignError(f"{root}: no record to publish ({report.get('input', 0)} read, {report.get('rejected', 0)} "
                            f"rejected: {top_reasons(report.get('reject_reasons', {}))}); fix the input or the options, "
                            "rerun expand, then publish (an empty upload would delete the repo's data/ shards)")


def _card(root: Path, choice: str | None, license: str | None) -> tuple[bytes | None, bool, list[str]]:
    """(the card to upload as README.md or None for the local file as it is, is README.md cogalign's, notes)."""
    from cogalign.expand.layout import read_manifest
    from cogalign.inputs.records import loads_exact
    from cogalign.expand.report import dataset_card

    if choice not in (None, "ours", "yours"):
        raise CogalignError(f"--card {choice!r}: choose ours (cogalign's dataset card) or yours (the README.md there)")
    ours = card_is_ours(root) or not (root / CARD).exists()
    if not ours and choice is None:
        raise CogalignError(f"{root / CARD} is not cogalign's dataset card (yours, kept by expand; it declares no "
                            "configs/dataset_info for this data): pass --card ours to upload cogalign's card in its "
                            "place (your file stays here), or --card yours to upload yours as it is")
    if choice == "yours" and not ours:
        return None, False, [f"README.md: yours, as it is{' (--license is not written into it)' if license else ''}"]
    report = loads_exact((root / "report.json").read_bytes())
    text = dataset_card(report, read_manifest(root), license).encode()
    notes = [] if license else ["note: no --license: the card names none; give the source data's license, "
                                "e.g. --license cc-by-4.0"]
    if any(isinstance(v, str) and os.path.isabs(v) for v in (report.get("options") or {}).values()):
        notes.append(f"note: {root / 'report.json'} holds local paths (an older cogalign wrote it); "
                     f"`cogalign merge-report {root}` rewrites it with names")
    return text, ours, notes


def publish(plan: PublishPlan, api=None) -> str:
    """Upload the plan's files; returns the commit URL. Checks the token before touching the repository."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise CogalignError("HF_HUB_OFFLINE is set: publishing needs the network; unset it and rerun")
    token = get_token()
    if not token:
        raise CogalignError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun")
    api = api or HfApi(endpoint=plan.endpoint, token=token)
    try:
        user = api.whoami(token=token)
    except Exception as e:  # network down, wrong endpoint, revoked token: all before any write
        raise CogalignError(f"cannot log in to {plan.endpoint} ({_short(e)}); check HF_TOKEN / `hf auth login` "
                            "and HF_ENDPOINT, then rerun") from None
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(user, dict) else None
    if role == "read":
        raise CogalignError("the Hugging Face token is read-only; create a write token at "
                            f"{plan.endpoint.rstrip('/')}/settings/tokens and set HF_TOKEN, then rerun")
    try:
        api.create_repo(plan.repo_id, repo_type="dataset", private=plan.private, exist_ok=True, token=token)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, repo_type="dataset", exist_ok=True, token=token)
        if plan.card is not None and plan.card_is_local:
            write_card(plan.folder, plan.card)  # README.md is cogalign's: it gets the license too
        upload_card = plan.card is not None and not plan.card_is_local  # cogalign's card in place of the user's
        allow = [glob.escape(path) for path, _ in plan.files if not (upload_card and path == CARD)]
        message = f"cogalign publish: {len(allow)} files"
        if hasattr(api, "upload_large_folder"):  # huggingface_hub < 2: the resumable large-folder path
            api.upload_large_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="dataset",
                                    revision=plan.revision, private=plan.private, allow_patterns=allow)
            _delete_stale(api, plan, token)
            if upload_card:
                _upload_card(api, plan, token)
            return plan.url
        # huggingface_hub >= 2: upload_folder commits large folders in batches and resumes (with hf_xet);
        # remote data/ files that are not uploaded now (an earlier run's shards) are deleted in the same commit
        info = api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="dataset",
                                 revision=plan.revision, allow_patterns=allow, delete_patterns=[STALE],
                                 commit_message=message, token=token)
        if upload_card:
            _upload_card(api, plan, token)
    except CogalignError:
        raise
    except Exception as e:
        who = user.get("name", "?") if isinstance(user, dict) else "?"
        raise CogalignError(f"upload to {plan.url} as {who} failed ({_short(e)}); rerun the same command to "
                            "resume (committed files are skipped)") from None
    return getattr(info, "commit_url", None) or plan.url


def _upload_card(api, plan: PublishPlan, token: str) -> None:
    api.upload_file(path_or_fileobj=plan.card, path_in_repo=CARD, repo_id=plan.repo_id, repo_type="dataset",
                    revision=plan.revision, token=token, commit_message="cogalign publish: dataset card")


def _delete_stale(api, plan: PublishPlan, token: str) -> None:
    """Remove remote data/ files this upload did not write: `datasets` would read them as part of the split."""
    from huggingface_hub import CommitOperationDelete

    ours = {path for path, _ in plan.files}
    remote = api.list_repo_files(plan.repo_id, repo_type="dataset", revision=plan.revision, token=token)
    stale = [p for p in remote if fnmatch.fnmatch(p, STALE) and p not in ours]
    if stale:
        api.create_commit(plan.repo_id, repo_type="dataset", revision=plan.revision, token=token,
                          operations=[CommitOperationDelete(path_in_repo=p) for p in stale],
                          commit_message=f"cogalign publish: remove {len(stale)} stale data files")


def resumable() -> bool:
    """upload_folder resumes only with hf_xet installed (a default dependency of huggingface_hub)."""
    try:
        import hf_xet  # noqa: F401
    except ImportError:
        return False
    return True


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:199] + "…"
