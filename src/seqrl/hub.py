"""Push a run's final model to the Hugging Face Hub (``hub.repo_id``), with ``huggingface_hub``.

The token is the usual one (``HF_TOKEN``, or the one ``hf auth login`` stored); ``HF_ENDPOINT``
points the upload at another Hub (a private mirror, or the local stand-in the tests use).
A failed push never loses the run: the model stays in ``final/`` and the message says how to
push it by hand.
"""

from __future__ import annotations

import os
from pathlib import Path


class HubPushError(RuntimeError):
    """The push to the Hub failed; the message names the repository and the local copy."""


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    commit_message: str = "Upload model trained with seqrl",
    token: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (``private``) and upload ``folder`` to it; the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"nothing to push: {folder} is not a directory")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message
        )
    except Exception as err:  # HTTP, auth, network: one message with the way out
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        raise HubPushError(
            f"pushing {folder} to the Hugging Face Hub as {repo_id!r} failed "
            f"({type(err).__name__}: {detail}). The model is saved in {folder}; push it later "
            f"with `hf upload {repo_id} {folder}` (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    return str(getattr(info, "commit_url", info))


def push_run(run_dir: str | Path, hub, console=None) -> str:
    """Push ``run_dir/final`` as the run config's ``hub`` section says; prints the commit URL."""
    url = push_folder(
        Path(run_dir) / "final",
        hub.repo_id,
        private=hub.private,
        commit_message=f"seqrl run {Path(run_dir).name}",
    )
    if console is not None:
        console.print(f"pushed {Path(run_dir) / 'final'} to the Hub: {url}")
    return url
