"""``distill push RUN_DIR REPO_ID``: a finished run's student on the Hugging Face Hub.

What is uploaded is laid out in a staging folder first (hard links, or copies across file
systems), so ``--dry-run`` shows exactly the files and the call that a push would make:

- the repository's root: the student (weights, config, tokenizer) and its model card (README.md);
- ``distill/``: the run's report, evaluation, config (credentials redacted when it was saved) and plots;
- ``adapter/`` with ``--adapter``: the LoRA adapter of a run whose student was merged;
- ``quantized/METHOD/`` with ``--quantized METHOD``: a student ``distill quantize`` wrote.

One ``create_repo`` (``exist_ok``) and one ``upload_folder`` commit, through ``huggingface_hub``.
Torch-free.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distill.errors import ConfigError, DistillError, first_line
from distill.rundir import RunDir


@dataclass
class Upload:
    """What a push sends: (local file, path in the repository) pairs and the call's arguments."""

    files: list[tuple[Path, str]]
    repo_id: str
    private: bool
    revision: str | None
    commit_message: str

    @property
    def bytes(self) -> int:
        return sum(local.stat().st_size for local, _ in self.files)

    def lines(self) -> list[str]:
        head = (f"create_repo(repo_id={self.repo_id!r}, repo_type='model', private={self.private}, exist_ok=True); "
                f"upload_folder(repo_id={self.repo_id!r}, revision={self.revision!r}, commit_message={self.commit_message!r}): "
                f"{len(self.files)} files, {self.bytes / 2**20:.2f} MB")
        return [head, *(f"  {remote}  ({local.stat().st_size:,} bytes)" for local, remote in sorted(self.files, key=lambda f: f[1]))]


def _files(folder: Path, prefix: str) -> list[tuple[Path, str]]:
    return [(path, prefix + path.relative_to(folder).as_posix()) for path in sorted(folder.rglob("*")) if path.is_file()]


def plan(run_dir: str | os.PathLike, repo_id: str, *, adapter: bool = False, quantized: tuple[str, ...] = (), private: bool = False,
         revision: str | None = None) -> Upload:
    """The upload of ``run_dir`` to ``repo_id``; one-line errors for what is missing, before anything is sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # start-up time: only distill push loads huggingface_hub

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"REPO_ID {repo_id!r} is not a hub repository id (user-or-org/name): {first_line(err)}") from None
    run = RunDir(run_dir)
    if not run.student.is_dir() or not run.eval.is_file():
        raise ConfigError(f"{run_dir} is not a finished run (needs student/ and eval.json); run distill run first")
    files = _files(run.student, "")
    for name in (RunDir.REPORT, RunDir.EVAL, RunDir.CONFIG):
        if (run.path / name).is_file():
            files.append((run.path / name, f"distill/{name}"))
    if run.plots.is_dir():
        files += _files(run.plots, "distill/plots/")
    if adapter:
        if not run.adapter.is_dir():
            raise ConfigError(f"--adapter: {run_dir} has no adapter/ (only a LoRA run with student.lora.merge=true keeps one beside the "
                              "merged student; an unmerged LoRA student is itself the adapter)")
        files += _files(run.adapter, "adapter/")
    for method in quantized:
        folder = run.quantized / method
        if not folder.is_dir():
            have = sorted(p.name for p in run.quantized.iterdir() if p.is_dir()) if run.quantized.is_dir() else []
            raise ConfigError(f"--quantized {method}: {run_dir} has no quantized/{method}/ (it has: {', '.join(have) or 'none'}); "
                              f"make it with distill quantize {run_dir} --method {method}")
        files += _files(folder, f"quantized/{method}/")
    message = f"distill: the student of run {run.path.resolve().name}"
    return Upload(files=files, repo_id=repo_id, private=private, revision=revision, commit_message=message)


def push(upload: Upload, *, dry_run: bool = False) -> str | None:
    """Sends ``upload`` (prints it first, on stdout); returns the commit's URL, or None with ``dry_run``."""
    from huggingface_hub import HfApi, get_token  # start-up time: only distill push loads huggingface_hub

    token = get_token()
    if not token and not dry_run:
        raise ConfigError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access to the repository)")
    for line in upload.lines():
        print(line, flush=True)
    if dry_run:
        print("--dry-run: nothing was sent", file=sys.stderr)
        return None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="distill-push-") as stage:
        for local, remote in upload.files:
            target = Path(stage) / remote
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local, target)
            except OSError:  # another file system
                shutil.copy2(local, target)
        try:
            api.create_repo(upload.repo_id, repo_type="model", private=upload.private, exist_ok=True)
            commit = api.upload_folder(repo_id=upload.repo_id, folder_path=stage, repo_type="model", revision=upload.revision,
                                       commit_message=upload.commit_message)
        except Exception as err:  # HfHubHTTPError, a refused token, no network: one line
            raise DistillError(f"cannot push to {upload.repo_id}: {first_line(err)[:300]}") from None
    url = getattr(commit, "commit_url", None) or str(commit)
    print(f"pushed {len(upload.files)} files to {upload.repo_id}: {url}", file=sys.stderr)
    return url
