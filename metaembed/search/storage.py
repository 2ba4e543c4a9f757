"""The on-disk format of a `MetaEmbedIndex` folder, owned here only: file names, shards, manifest, atomic writes.

    index.json                          dim, vectors per candidate, storage dtype, model it came from
    shard-00000-of-00001.safetensors    "embeddings" [n, R_c, D] (float32 / float16 / int8),
                                        "scales" [n, R_c] float32 (int8 storage only)
    shard-00000-of-00001.json           ids and metadata of that shard's candidates
    ann.faiss                           optional: the first-stage ANN index (faiss, built by `build_ann`)

Each process of a multi-process encode (`metaembed index`) writes its own shard pair, so shards need no
coordination; `shard_files` checks that all shards of each group are there.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
INDEX_FORMAT = "metaembed-index"
MANIFEST_FILE = "index.json"
ANN_FILE = "ann.faiss"
_SHARD_PATTERN = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "I8": torch.int8}


def shard_stem(folder: str, number: int, total: int) -> str:
    """The path of shard `number` of `total` without its suffix (`.safetensors` / `.json`)."""
    return os.path.join(folder, f"shard-{number:05d}-of-{total:05d}")


def shard_is_complete(folder: str, number: int, total: int, ids: list[Any]) -> bool:
    """Shard `number` of `total` is written whole (both files) and holds exactly `ids`, in order."""
    stem = shard_stem(folder, number, total)
    if not (os.path.isfile(stem + ".safetensors") and os.path.isfile(stem + ".json")):
        return False
    with open(stem + ".json", encoding="utf-8") as file:
        return json.load(file).get("ids") == ids


def shard_files(folder: str) -> list[str]:
    """The shard files (`.safetensors`) of the index in `folder`, sorted; raises if a group misses a shard."""
    names = sorted(path for path in os.listdir(folder) if _SHARD_PATTERN.match(path))
    if not names:
        raise ValueError(f"{folder} holds no shards")
    groups: dict[int, set[int]] = {}
    for name in names:
        number, total = map(int, _SHARD_PATTERN.match(name).groups())
        groups.setdefault(total, set()).add(number)
    for total, numbers_found in groups.items():
        missing = sorted(set(range(total)) - numbers_found)
        if missing:
            raise ValueError(f"{folder}: shard(s) {missing} of {total} are missing (an interrupted encode?)")
    return [os.path.join(folder, name) for name in names]


def read_shard(path: str, mmap: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[Any], list[Any] | None]:
    """(stored embeddings, int8 scales or None, ids, metadata or None) of the shard at `path` (`.safetensors`)."""
    tensors = _read_safetensors(path, mmap)
    with open(path.removesuffix(".safetensors") + ".json", encoding="utf-8") as file:
        sidecar = json.load(file)
    return tensors["embeddings"], tensors.get("scales"), sidecar["ids"], sidecar.get("metadata")


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The content of `index.json` in `folder`; None when there is none; raises if it is not an index's."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a MetaEmbed index manifest")
    return manifest


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Write `index.json` atomically."""
    write_json_atomically(os.path.join(folder, MANIFEST_FILE), manifest)


def write_shard(
    folder: str,
    number: int,
    total: int,
    embeddings: torch.Tensor,
    scales: torch.Tensor | None,
    ids: list[Any],
    metadata: list[Any] | None,
) -> None:
    """Write shard `number` of `total` (stored embeddings `[n, R, D]`, int8 scales `[n, R]`, ids, metadata).
    Files are written under a temporary name and renamed, so a reader never sees half a shard."""
    stem = shard_stem(folder, number, total)
    tensors = {"embeddings": embeddings.contiguous()}
    if scales is not None:
        tensors["scales"] = scales.contiguous()
    write_json_atomically(stem + ".json", {"ids": ids, "metadata": metadata})
    _write_atomically(stem + ".safetensors", lambda temporary: save_file(tensors, temporary))  # last: shard done


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary)` to a temporary name unique to this writer, then rename to `path`: readers and other
    processes writing the same file (every rank writes the manifest) never see or clobber a partial file."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        # The mode a new file gets under the user's umask: kept, as safetensors' writer (and mkstemp) would
        # leave 0600 and lock other readers of a shared index out.
        with open(temporary, "x"):
            mode = os.stat(temporary).st_mode & 0o777
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomically(path: str, value: Any) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file)

    _write_atomically(path, write)


def _read_safetensors(path: str, mmap: bool) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; with `mmap`, views of a copy-on-write memory map of the file (the same
    mechanism as `torch.load(mmap=True)`), so nothing is read until used."""
    if not mmap:
        from safetensors.torch import load_file

        return load_file(path)
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    size = os.path.getsize(path)
    data_start = 8 + header_size
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    needed = data_start + max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if size < needed:
        raise ValueError(f"{path} is truncated: {size} bytes, its header describes {needed}")
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    tensors = {}
    for name, entry in entries.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected F32, F16 or I8")
        offset = data_start + entry["data_offsets"][0]
        element_size = torch.empty((), dtype=dtype).element_size()
        if offset % element_size:
            # Not aligned for a view (files written by other tools can be): this one tensor is read instead.
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                tensors[name] = file.get_tensor(name)
            continue
        tensor = torch.empty(0, dtype=dtype)
        tensor.set_(storage, offset // element_size, entry["shape"])
        tensors[name] = tensor
    return tensors


def quantize(embeddings: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float `[n, R, D]` embeddings in a storage dtype: (stored `[n, R, D]`, None), or for "int8" (int8
    `[n, R, D]`, float32 scales `[n, R]`) with one symmetric max-abs scale per vector."""
    if storage != "int8":
        return embeddings.to(STORAGE_DTYPES[storage]).contiguous(), None
    embeddings = embeddings.float()
    scales = embeddings.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    quantized = torch.round(embeddings / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return quantized.contiguous(), scales.contiguous()


def dequantize(stored: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 `[n, r, D]` from stored vectors (and int8 scales `[n, r]`)."""
    if scales is None:
        return stored.float()
    return stored.float() * scales.float().unsqueeze(-1)
