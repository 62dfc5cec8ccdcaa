"""Uploading an exported folder to the Hugging Face Hub with `huggingface_hub` (optional; not run by the tests
against the real Hub: they check everything up to the upload call)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["push_folder"]


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo `repo_id` if needed and upload every file of `folder` in one commit.

    Uses the token huggingface_hub finds (`hf auth login` or HF_TOKEN). Returns the repo's URL.
    Raises ValueError (one line) without huggingface_hub, or if the Hub refuses; the folder stays written.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ValueError(f"--push-to-hub needs huggingface_hub (pip install huggingface_hub); the export is "
                         f"written at {folder}") from None
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {Path(folder).name}, exported by fcmae-convert")
    except Exception as e:  # authentication, network, a bad repo id: one line, the folder is kept
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"could not push {folder} to the Hub repo {repo_id} ({type(e).__name__}: {reason}); the "
                         "export is written there, push it again later") from None
    return str(repo)
