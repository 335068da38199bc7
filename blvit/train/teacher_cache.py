"""Teacher embeddings computed once and read from disk (as MobileSAM and EdgeSAM train).

The SA-1B pipeline has no photometric or geometric augmentation, so the teacher's output for
a sample never changes: computing it once saves the teacher's forward pass (for ViT-H most of
a training step) in every later epoch. Entries are keyed by what travels with a copy of the
data: the sample's file name, its place in a shard and its size in bytes, so data regenerated or
replaced in place is computed again while a copy on a node-local disk finds the same entries; a
``meta.json`` records what produced them (the teacher file's size and a hash of its first and
last MiB, its architecture, the image size and the precision), so a cache made by another
teacher, a retrained one written over the same path, or another image size is refused rather
than silently used.
"""
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from blvit.data.sa1b import SA1BDataset, SampleRef, collate_skipping
from blvit.utils.io import atomic_save, atomic_write_text

logger = logging.getLogger(__name__)


# bytes hashed at each end of a teacher file: a retrained teacher differs there (its first and
# last tensors), and reading 2 MiB costs nothing next to loading it
SIGNATURE_BYTES = 1 << 20


def file_signature(path: str) -> Dict[str, Any]:
    """Size and a hash of the first and last MiB of a file: what tells a rewritten file from the
    old one, and what a copy elsewhere (another node's disk, another name) keeps."""
    size = os.path.getsize(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(SIGNATURE_BYTES))
        f.seek(max(0, size - SIGNATURE_BYTES))
        digest.update(f.read(SIGNATURE_BYTES))
    return {"bytes": size, "sha1_ends": digest.hexdigest()}


def entry_name(ref: SampleRef) -> str:
    """The cache file of a sample: a hash of its file's name, its place in a shard and its size
    (another image under the same name is another entry; a copy of the data is the same one)."""
    path, offset, size = ref.image
    nbytes = os.path.getsize(path) if size < 0 else size
    key = json.dumps([os.path.basename(ref.name), os.path.basename(path), offset, nbytes])
    return hashlib.sha1(key.encode()).hexdigest()[:20] + ".pt"


class TeacherEmbeddingCache(Dataset):
    """Wraps an ``SA1BDataset``; each item gains ``teacher_embedding`` (C, H/16, W/16) float32."""

    def __init__(self, dataset: SA1BDataset, cache_dir: Path) -> None:
        self.dataset, self.cache_dir = dataset, Path(cache_dir)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is None:
            return None
        path = self.cache_dir / entry_name(self.dataset.refs[index])
        try:
            item["teacher_embedding"] = torch.load(path, map_location="cpu", weights_only=True).float()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: teacher embedding of {self.dataset.refs[index].name} missing (was its "
                                    f"file rewritten during the run?); delete {self.cache_dir} to rebuild the cache") from err
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise ValueError(f"{path}: damaged teacher embedding of {self.dataset.refs[index].name} "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); "
                             f"delete {self.cache_dir} to rebuild the cache") from err
        return item


def build_cache(teacher: nn.Module, dataset: SA1BDataset, cache_dir: Path, meta: Dict[str, Any], device: torch.device,
                amp: bool, batch_size: int, rank: int = 0, world: int = 1) -> int:
    """Compute the missing embeddings (each rank a stride of the samples); returns how many.

    Stored in bfloat16 (half the disk, the precision the teacher runs at on GPU).
    """
    cache_dir = Path(cache_dir)
    meta = json.loads(json.dumps(meta, sort_keys=True))  # as it reads back from disk
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        found = json.loads(meta_path.read_text())
        if found != meta:
            raise ValueError(f"{meta_path}: the cache was made for {found}, this run needs {meta}; "
                             "point teacher.cache_dir elsewhere or delete it")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not meta_path.exists() and rank == 0:
        atomic_write_text(meta_path, json.dumps(meta, sort_keys=True))
    todo: List[int] = [i for i in range(rank, len(dataset), world)
                       if not (cache_dir / entry_name(dataset.refs[i])).exists()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size,
                                         collate_fn=collate_skipping)
    done = 0
    with torch.no_grad(), tqdm(total=len(todo), desc="teacher cache", disable=rank != 0) as bar:
        for batch in loader:
            bar.update(int(batch["skipped"]) + (len(batch["index"]) if "index" in batch else 0))
            if "image" not in batch:
                continue
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                embeddings = teacher(batch["image"].to(device))
            for index, embedding in zip(batch["index"].tolist(), embeddings):
                atomic_save(embedding.to(torch.bfloat16).cpu().clone(), cache_dir / entry_name(dataset.refs[index]))
                done += 1
    if world > 1:
        torch_dist.barrier()
    if rank == 0:
        logger.info("teacher cache %s: %d embeddings computed", cache_dir, done)
    return done
