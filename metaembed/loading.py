"""Loading a MetaEmbed model named by a user or by data (an index's `index.json`, a config) without running code
that came with it.

A saved MetaEmbed folder carries the Hub set (`modeling_metaembed.py`, ...) as remote code. The installed package
holds the same classes, so by default a folder is served by them and none of its files is imported. A folder whose
.py files are not the installed package's (edited, another version, or extra modules) is refused, saying which
files differ: serving it with other code than it was saved with could silently give other vectors, and running
its code is the user's decision (`trust_remote_code=True`, `--trust-remote-code` on the command line).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["foreign_code_files", "load_model"]

# Keyword arguments of from_pretrained that locate a Hub repo's files.
_LOCATION_KWARGS = ("cache_dir", "local_files_only", "token", "revision", "subfolder")


def foreign_code_files(name_or_path: str | os.PathLike, **location: Any) -> list[str]:
    """The .py files of a model folder (or Hub repo) that are not byte-identical to the installed package's Hub set
    files of the same name, sorted; empty when the folder carries only the installed code (or none)."""
    from modeling_metaembed import HUB_FILES, _hub_file

    folder = _code_folder(os.fspath(name_or_path), location)
    if folder is None:
        return []
    foreign = []
    for path in sorted(folder.glob("*.py")):
        installed = _hub_file(path.name, None) if path.name in HUB_FILES else None
        if installed is None or path.read_bytes() != installed:
            foreign.append(path.name)
    return foreign


def _code_folder(name_or_path: str, location: dict[str, Any]) -> Path | None:
    """The local folder holding the top-level .py files of a model folder or Hub repo (only those are fetched)."""
    subfolder = location.get("subfolder") or ""
    if os.path.isdir(name_or_path):
        return Path(name_or_path, subfolder)
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*.py" if subfolder else "*.py"
    options = {key: location[key] for key in ("cache_dir", "local_files_only", "token", "revision") if key in location}
    return Path(snapshot_download(name_or_path, allow_patterns=[pattern], **options), subfolder)


def load_model(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, **from_pretrained_kwargs: Any):
    """A `MetaEmbedModel` (processor attached) from a folder or Hub repo id.

    Args:
        name_or_path: the model folder or repo id (for example the one an index records).
        trust_remote_code: `False` (default): served by the installed package's classes, nothing of the folder is
            imported; a folder whose .py files differ from them is refused (`ValueError` naming the files).
            `True`: loaded with `AutoModel.from_pretrained(..., trust_remote_code=True)`, running the folder's code:
            only for folders whose author you trust.
        **from_pretrained_kwargs: `dtype`, `device_map`, `revision`, ... as for `from_pretrained`.
    """
    if trust_remote_code:
        from transformers import AutoModel

        return AutoModel.from_pretrained(name_or_path, trust_remote_code=True, **from_pretrained_kwargs)
    location = {key: from_pretrained_kwargs[key] for key in _LOCATION_KWARGS if key in from_pretrained_kwargs}
    foreign = foreign_code_files(name_or_path, **location)
    if foreign:
        raise ValueError(
            f"{os.fspath(name_or_path)} carries code that is not the installed metaembed package's "
            f"({', '.join(foreign)} differ or are unknown to it); that code is never run unless you trust it: "
            "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust the folder's author, or "
            "save the model again with this version of metaembed"
        )
    from modeling_metaembed import MetaEmbedModel

    return MetaEmbedModel.from_pretrained(name_or_path, trust_remote_code=False, **from_pretrained_kwargs)
