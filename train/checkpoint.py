"""Training checkpoints: engine state + every rank's loader state and RNG + step and tokens, written atomically,
with a manifest that a resume checks before anything loads.

Layout: RUN_DIR/checkpoints/step_00000100/ (DeepSpeed files, rank_00000.pt ... (RNG), loader.pt (every
rank's loader state, {"ranks": [...]}, so a loader can re-split them), train_state.json (step, tokens, ...),
config.yaml, model_config.json, manifest.json) and RUN_DIR/checkpoints/latest naming the newest complete one.
A save goes to `step_N.tmp` and is renamed only when every rank has written its part and manifest.json (every
file's relative path, size and sha256, every rank's files included) is written last, so a crash mid-save
leaves the previous checkpoint as `latest`.

Resume: the candidates are the folder `latest` names, then the older step_N folders (checkpoint.keep_last),
newest first. Each is checked against its manifest before anything loads; a missing, resized or altered file,
or a file of ours (rank_N.pt, loader.pt) that holds more than plain data, rules a checkpoint out with a
warning naming the file, and the next older one is tried. The hashing is split over the ranks by size (each
reads about 1/world of the folder: a full checkpoint's read costs its size / ranks, at save and at resume,
rather than every rank hashing every gigabyte, or rank 0 alone doing it while the others wait); rank 0
collects the findings and broadcasts the verdict, so every rank takes the same checkpoint. A checkpoint
written before manifests existed is accepted with a note, after a check that its files are present and
complete.

Our own files hold tensors and plain data only (the numpy and python RNG states as a tensor and ints, lists),
and are read with torch.load(weights_only=True): a file that names code to run is refused, never executed.
DeepSpeed's own files are read by DeepSpeed.

RNG: each rank's file holds its torch CPU, python, numpy and (with CUDA) every visible GPU's generator. A
resume on the same number of ranks restores them, so dropout etc. continue exactly; on another number the
old streams belong to no rank in particular, and the run goes on with fresh ones (the data order is the
loader's and does not depend on them).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from data.files import atomic_write
from train.config import CheckpointConfig
from train.faults import maybe_fault
from train.rendezvous import run_once_on_rank0

MANIFEST_NAME = "manifest.json"
# Files of ours, read with weights_only=True: the rest of a folder is DeepSpeed's or JSON/YAML.
_PLAIN_FILE = re.compile(r"(rank_\d+|loader)\.pt")
# An array's reconstruction runs no code of the file's; numpy 1 wrote the module as numpy.core.
_NUMPY_ARRAY = [np.dtype, np.ndarray, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct,
                (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


def seed_host_generators(seed: int, rank: int) -> None:
    """Seeds python's `random` and numpy's global generator from (seed, rank): each rank draws its own stream
    (e.g. augmentation in the training process), the same on every start. torch's generator is seeded with
    `seed` alone by the caller: the initial weights must be the same on every rank."""
    derived = int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)


def _rng_state() -> Dict[str, Any]:
    """Every generator of this process as tensors, ints, floats and lists (loadable with weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(),
             "python": [version, list(internal), gauss_next],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per visible device
    return state


def _set_rng_state(state: Dict[str, Any]) -> Optional[str]:
    """Restores the generators; returns why the CUDA ones were not restored, or None."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # written before manifests: numpy's own tuple, array included
        np.random.set_state(numpy_state)
    if not torch.cuda.is_available():
        return "this run has no CUDA device" if "cuda" in state else None
    if "cuda" not in state:
        return "the checkpoint holds no CUDA generator state (written without CUDA)"
    if len(state["cuda"]) != torch.cuda.device_count():
        return (f"the checkpoint holds {len(state['cuda'])} GPUs' generators, this rank sees "
                f"{torch.cuda.device_count()}")
    torch.cuda.set_rng_state_all(state["cuda"])
    return None


def load_plain(path: Path, legacy: bool = False, allowed: Sequence[Any] = ()) -> Any:
    """torch.load of tensors, numbers, strings, lists and dicts (weights_only=True), refusing anything else.

    legacy: also numpy arrays, which rank files written before manifests hold; allowed: further classes
    (e.g. DeepSpeed's data classes), built from their fields. Raises ValueError naming the file and what it
    names when it holds anything else: unpickling such a file could run code, so it is never unpickled."""
    allowed = [*allowed, *(_NUMPY_ARRAY if legacy else [])]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {named.group(1)}" if named else str(e).strip().splitlines()[-1]
        raise ValueError(f"{path} holds more than tensors and plain data ({what}): refused to unpickle it, "
                         f"as that could run code") from None


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _from_rank0(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(obj: Any, world_size: int) -> list:
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _shares(sizes: Dict[str, int], world_size: int,
            seen_by: Optional[Dict[str, List[int]]] = None) -> List[List[str]]:
    """The files each rank hashes: largest first to the least loaded rank (of those that see the file, when
    seen_by says), the same split on every rank."""
    shares: List[List[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        least = min(seen_by[rel] if seen_by else range(world_size), key=lambda r: (loads[r], r))
        shares[least].append(rel)
        loads[least] += sizes[rel]
    return shares


def _sha256(f) -> str:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _file_problem(step_dir: Path, rel: str, entry: Dict[str, Any], legacy: bool = False) -> Optional[str]:
    """What is wrong with one file of a checkpoint against its manifest entry (entry None: presence only)."""
    path = step_dir / rel
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size  # of the opened file: fresh on a network filesystem too
            if entry is not None and size != entry["size"]:
                return f"{rel} is {size} bytes, the manifest says {entry['size']} (cut short or replaced)"
            if entry is not None and _sha256(f) != entry["sha256"]:
                return f"{rel} does not match its sha256 in the manifest (damaged)"
    except FileNotFoundError:
        return f"{rel} is missing"
    except OSError as e:
        return f"{rel} cannot be read ({e.strerror or e})"
    if _PLAIN_FILE.fullmatch(rel):
        try:
            load_plain(path, legacy=legacy)
        except ValueError as e:
            return f"{rel} {str(e).removeprefix(str(path) + ' ')}"
        except Exception as e:  # cut short: torch names what it could not read
            return f"{rel} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _legacy_problems(step_dir: Path) -> List[str]:
    """A checkpoint without manifest: every file the load reads is present and every .pt a complete archive."""
    try:
        world_size = int(json.loads((step_dir / "train_state.json").read_text(encoding="utf-8"))["world_size"])
    except FileNotFoundError:
        return ["train_state.json is missing"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"train_state.json is unreadable ({type(e).__name__}: {e})"]
    needed = [f"rank_{r:05d}.pt" for r in range(world_size)] + ["loader.pt"]
    problems = [p for rel in needed if (p := _file_problem(step_dir, rel, None, legacy=True))]
    # torch.save writes a zip whose directory sits at the end: a truncated file is not a zip.
    problems += [f"{p.relative_to(step_dir).as_posix()} is cut short (not a complete archive)"
                 for p in sorted(step_dir.rglob("*.pt")) if p.name not in needed and not zipfile.is_zipfile(p)]
    return problems


class Checkpointer:
    def __init__(self, run_dir: str, cfg: CheckpointConfig, rank: int, world_size: int,
                 log: Callable[[str], None] = _stderr):
        """log: where rank 0 says what a resume skips or does not restore (damaged checkpoints, RNG streams);
        e.g. the metrics sink's message."""
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.log = log

    def resume_point(self) -> Optional[Tuple[Path, str]]:
        """Collective. (folder, tag) to resume from per checkpoint.resume, or None to start fresh: the newest
        candidate whose files match its manifest, the same on every rank. Raises (on every rank) when there
        are candidates and none is usable, naming what is wrong with each."""
        if self.cfg.resume == "none":
            return None
        candidates = _from_rank0(self._candidates() if self.rank == 0 else None)
        if not candidates:
            return None
        skipped: List[Tuple[Path, str]] = []
        for step_dir in candidates:
            problem, note = self._check(step_dir)
            if problem is None:
                if self.rank == 0:
                    for bad, why in skipped:
                        self.log(f"warning: checkpoint {bad} is damaged ({why}): resuming from {step_dir} instead")
                    if note:
                        self.log(note)
                return step_dir.parent, step_dir.name
            skipped.append((step_dir, problem))
        listing = "; ".join(f"{bad}: {why}" for bad, why in skipped)
        raise RuntimeError(f"checkpoint.resume={self.cfg.resume}: no usable checkpoint ({listing}). Repair or "
                           f"remove them, or set checkpoint.resume=none to start from scratch")

    def _candidates(self) -> List[Path]:
        """Rank 0: the step folders to try, in order (`latest`'s, then older ones, newest first)."""
        if self.cfg.resume != "auto":
            return [Path(self.cfg.resume)]
        done = sorted((p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                      reverse=True)
        latest = self.root / "latest"
        if not latest.is_file():
            return done
        tag = latest.read_text(encoding="utf-8").strip()
        older = [p for p in done if p.name < tag] if re.fullmatch(r"step_\d+", tag) else done
        return [self.root / tag] + [p for p in older if p.name != tag]

    def _check(self, step_dir: Path) -> Tuple[Optional[str], Optional[str]]:
        """Collective: (what is wrong, None) or (None, a note or None), rank 0's verdict on every rank."""
        plan: Any = None
        if self.rank == 0:
            try:
                plan = self._plan_check(step_dir)
            except Exception as e:  # answer the other ranks, who wait for the plan
                plan = ("verdict", f"cannot be checked ({type(e).__name__}: {e})", None)
        plan = _from_rank0(plan)
        if plan[0] == "verdict":
            return plan[1], plan[2]
        entries: Dict[str, Dict[str, Any]] = plan[1]
        mine = _shares({rel: e["size"] for rel, e in entries.items()}, self.world_size)[self.rank]
        found = _gathered([p for rel in mine if (p := _file_problem(step_dir, rel, entries[rel]))], self.world_size)
        verdict = "; ".join(sorted(p for problems in found for p in problems)) or None
        return _from_rank0(verdict), None

    @staticmethod
    def _plan_check(step_dir: Path) -> tuple:
        """Rank 0: ("hash", manifest entries) or ("verdict", problem, note) when no hashing is needed."""
        if not step_dir.is_dir():
            return "verdict", "the folder does not exist", None
        manifest = step_dir / MANIFEST_NAME
        if manifest.is_file():
            try:
                entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
                if not all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in entries.values()):
                    raise ValueError("an entry lacks an int size or a sha256 string")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                return "verdict", f"{MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})", None
            return "hash", entries
        try:
            has_manifest = json.loads((step_dir / "train_state.json").read_text(encoding="utf-8")).get("manifest")
        except (OSError, ValueError, AttributeError):
            has_manifest = None  # the legacy check names it
        if has_manifest:
            return "verdict", f"{MANIFEST_NAME} is missing", None
        problems = _legacy_problems(step_dir)
        if problems:
            return "verdict", "; ".join(problems), None
        return "verdict", None, (f"note: checkpoint {step_dir} has no {MANIFEST_NAME} (written before checkpoints "
                                 f"carried one): checked that its files are present and complete, not their checksums")

    def save(self, engine, step: int, loader_state: Dict[str, Any], config_yaml: str,
             extra: Optional[Dict[str, Any]] = None, others: Optional[Dict[str, Any]] = None) -> Path:
        """Collective. loader_state is this rank's; extra (JSON data: tokens, wall_s ...) goes to train_state.json.
        others: further trained engines by name (PPO's critic), each saved in the step folder's NAME/."""
        tag = f"step_{step:08d}"
        tmp_tag = tag + ".tmp"
        tmp_dir = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a save that crashed
        dist.barrier()
        gathered = _gathered(loader_state, self.world_size)
        engine.save(str(self.root), tmp_tag, client_state={"step": step})
        for name, other in (others or {}).items():
            other.save(str(tmp_dir), name, client_state={"step": step})
        torch.save({"rng": _rng_state(), "step": step}, tmp_dir / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save({"ranks": gathered}, tmp_dir / "loader.pt")
        maybe_fault("save", step, self.rank)
        dist.barrier()
        error = None
        if self.rank == 0:
            try:
                _verify(tmp_dir, self.world_size)
                (tmp_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
                # The model's own config.json content, so train.export needs nothing but this folder.
                (tmp_dir / "model_config.json").write_text(
                    json.dumps(engine.module.config.to_dict(), indent=2), encoding="utf-8")
                (tmp_dir / "train_state.json").write_text(json.dumps(
                    {**(extra or {}), "step": step, "world_size": self.world_size, "manifest": MANIFEST_NAME}),
                    encoding="utf-8")
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        error = _from_rank0(error)
        if error is not None:
            raise RuntimeError(f"rank 0 could not complete checkpoint {tmp_dir}: {error}")
        self._write_manifest(tmp_dir)
        if self.rank == 0:
            final = self.root / tag
            shutil.rmtree(final, ignore_errors=True)
            # A folder that every rank (and DeepSpeed) wrote, verified by its manifest: renamed here, not through
            # data.files.atomic_write, which writes one file.
            os.replace(tmp_dir, final)
            atomic_write(self.root / "latest", tag)
            self._prune()
        dist.barrier()
        return self.root / tag

    def _write_manifest(self, step_dir: Path) -> None:
        """Collective, the last write of a save: every file's size and sha256 into manifest.json (rank 0).

        Every rank lists the folder and hashes a share of what it sees (on a network filesystem a rank may see
        another's new file late, its own at once); the size recorded is what was hashed."""
        seen = {p.relative_to(step_dir).as_posix(): p.stat().st_size for p in step_dir.rglob("*") if p.is_file()}
        sizes: Dict[str, int] = {}
        seen_by: Dict[str, List[int]] = {}
        for rank, listing in enumerate(_gathered(seen, self.world_size)):
            for rel, size in listing.items():
                sizes[rel] = max(size, sizes.get(rel, 0))
                seen_by.setdefault(rel, []).append(rank)
        digests = {}
        for rel in _shares(sizes, self.world_size, seen_by)[self.rank]:
            with open(step_dir / rel, "rb") as f:
                digests[rel] = {"size": os.fstat(f.fileno()).st_size, "sha256": _sha256(f)}
        everyone = _gathered(digests, self.world_size)
        if self.rank == 0:
            files = {rel: entry for share in everyone for rel, entry in share.items()}
            atomic_write(step_dir / MANIFEST_NAME, json.dumps({"files": dict(sorted(files.items()))}, indent=1))

    def load(self, engine, folder: Path, tag: str,
             others: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Collective. Restores engine (and the `others` engines save wrote) and RNG; returns (train_state.json's content, the loader state:
        {"ranks": [...]}, every rank's, as data.loading.loader's load_state_dict takes it). Our files are read first,
        and a rank that cannot read its own stops every rank with the same error before DeepSpeed loads."""
        step_dir = folder / tag
        state = json.loads((step_dir / "train_state.json").read_text(encoding="utf-8"))
        old_world = state["world_size"]
        legacy = not (step_dir / MANIFEST_NAME).is_file()
        mine = loader_state = error = None
        try:
            mine = load_plain(step_dir / f"rank_{self.rank % old_world:05d}.pt", legacy=legacy)
            loader_state = load_plain(step_dir / "loader.pt", legacy=legacy)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        errors = [f"rank {r}: {e}" for r, e in enumerate(_gathered(error, self.world_size)) if e is not None]
        if errors:
            raise RuntimeError(f"loading checkpoint {step_dir} failed: " + "; ".join(errors))
        if old_world != self.world_size and engine.cfg.engine.zero_stage in (1, 2):
            # ZeRO 1-2 optimizer state is cut into old_world pieces: DeepSpeed's universal checkpoint holds
            # it per parameter, and any number of ranks loads that.
            universal = self._universal(folder, tag, old_world)
            engine.load(str(universal.parent), universal.name, universal=True)
        elif old_world != self.world_size and engine.cfg.engine.zero_stage == 3:
            raise ValueError(
                f"checkpoint {step_dir} was written by {old_world} ranks with ZeRO stage 3, this run has "
                f"{self.world_size}: resuming ZeRO-3 on another number of ranks is not supported (ZeRO 0-2 "
                f"checkpoints resume on any number; the data loader re-splits its epoch either way)")
        else:
            engine.load(str(folder), tag)
        for name, other in (others or {}).items():
            if old_world != self.world_size:
                raise ValueError(f"checkpoint {step_dir} was written by {old_world} ranks, this run has "
                                 f"{self.world_size}: its {name} engine resumes only on the same number of ranks")
            if not (step_dir / name).is_dir():
                raise ValueError(f"checkpoint {step_dir} has no {name}/ folder: it was not written by a run of "
                                 f"this kind")
            other.load(str(step_dir), name)
        if old_world == self.world_size:
            not_cuda = _set_rng_state(mine["rng"])
            if not_cuda is not None and self.rank == 0:
                self.log(f"CPU RNG restored from {step_dir}, CUDA RNG fresh: {not_cuda}")
        elif self.rank == 0:
            self.log(f"{step_dir} was written by {old_world} ranks, this run has {self.world_size}: "
                     f"the RNG streams (dropout etc.) start fresh")
        return state, loader_state

    def _universal(self, folder: Path, tag: str, old_world: int) -> Path:
        """RUN_DIR/checkpoints/universal/<tag>: DeepSpeed's per-parameter form of a ZeRO 1-2 checkpoint,
        converted once by rank 0 (python -m deepspeed.checkpoint.ds_to_universal), then read by every rank.

        The others poll for its DONE marker (train.rendezvous) rather than wait in a barrier: for the 8B
        model the conversion takes longer than a collective may wait."""
        out = self.root / "universal" / tag

        def convert() -> None:
            shutil.rmtree(out, ignore_errors=True)  # converted by a version that wrote no DONE marker
            tmp = out.with_name(tag + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                   "--input_folder", str(folder / tag), "--output_folder", str(tmp),
                                   "--inject_missing_state", "--num_extract_workers", "1",
                                   "--num_merge_workers", "1"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {folder / tag} (written by {old_world} ranks) to DeepSpeed's "
                                   f"universal checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            (tmp / "DONE").write_text(tag, encoding="utf-8")
            os.replace(tmp, out)  # a folder DeepSpeed's converter wrote: DONE appears with it, complete

        run_once_on_rank0(out / "DONE", convert, self.rank,
                          f"converting {folder / tag} to DeepSpeed's universal checkpoint",
                          failed=out.with_name(tag + ".FAILED"))
        return out

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / old.name, ignore_errors=True)
            (self.root / "universal" / f"{old.name}.FAILED").unlink(missing_ok=True)


def _verify(folder: Path, world_size: int) -> None:
    """A checkpoint is complete when every rank's file is there and no .pt file is cut short."""
    missing = [f"rank_{r:05d}.pt" for r in range(world_size) if not (folder / f"rank_{r:05d}.pt").is_file()]
    missing += [] if (folder / "loader.pt").is_file() else ["loader.pt"]
    # torch.save writes a zip whose directory sits at the end: a truncated file is not a zip.
    broken = [p.name for p in sorted(folder.rglob("*.pt")) if not zipfile.is_zipfile(p)]
    if missing or broken:
        raise RuntimeError(f"checkpoint {folder} is incomplete (missing {missing}, truncated {broken}); "
                           f"`latest` still names the previous one")
