"""Steps on preference pairs (data.render=pairs: a batch of B pairs has 2B rows, the chosen answers first):
DPO, and the Bradley-Terry reward model (a score model; its export is loadable as a reward).
A step's model FLOPs (train.flops) count the training passes and, for DPO without a precomputed table, the
reference's forward (the table itself is computed once before training, outside every step).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from data.files import atomic_path
from data.loading.loader import build_loader
from model.score import last_token_scores
from train.algorithm import Algorithm, StepResult
from train.checkpoint import load_plain
from train.config import TrainConfig
from train.engine import Engine
from train.flops import ModelFlops, training_passes
from train.rl import losses as L
from train.rl.reference import Reference, gathered, reference_mode
from train.rl.rollout import answer_mask

REFERENCE_TABLE = "reference_logprobs.pt"


def _halves(batch: Dict[str, Any]) -> int:
    pairs = batch.get("num_pairs")
    if pairs is None or batch["input_ids"].shape[0] != 2 * pairs:
        raise ValueError(f"a preference batch must hold 2 x num_pairs rows (chosen, then rejected); got "
                         f"{batch['input_ids'].shape[0]} rows and num_pairs={pairs} (is data.render=pairs?)")
    return pairs


def _pair_ids(batch: Dict[str, Any]) -> List[Tuple[str, int]]:
    """(dataset, position in its epoch order's source) of each pair: the same in every epoch and on any rank."""
    return [(str(u[0]), int(u[2])) for u in batch["uids"][: batch["num_pairs"]]]


def one_pass(cfg: TrainConfig, rank: int, world_size: int, shards: Optional[List[str]] = None
             ) -> Iterator[Dict[str, Any]]:
    """This rank's share of every pair of the data (or of `shards`) once, in batches: a loader of its own
    (no workers, no shuffle) read until each dataset has begun its second epoch. Pairs at the turn of the
    epoch may come twice; callers key their results by pair."""
    data = dataclasses.replace(cfg.data, num_workers=0, shuffle_buffer=0)
    if shards is not None:
        data = dataclasses.replace(data, shards=list(shards), datasets=[])
    loader = build_loader(data, rank=rank, world_size=world_size, seed=cfg.seed)
    names = {d.name for d in data.datasets} if data.datasets else None
    second_epoch: set = set()
    seen: set = set()
    for batch in loader:
        yield batch
        for uid in batch["uids"][: batch["num_pairs"]]:
            seen.add(uid[0])
            if uid[1] >= 1:
                second_epoch.add(uid[0])
        if second_epoch and second_epoch >= (names or seen):
            return


def _gather_table(table: Dict[Tuple[str, int], Tuple[float, float]], world_size: int) -> Dict:
    everyone: List[Any] = [None] * world_size
    dist.all_gather_object(everyone, table)
    merged: Dict = {}
    for part in everyone:
        merged.update(part)
    return merged


class DPOStep(Algorithm):
    """DPO on pairs; the reference's log-probabilities come from a table computed once before training
    (rl.precompute_reference: then no reference model stays in memory) or from the reference each step."""

    def __init__(self, cfg: TrainConfig, engine: Engine, loader, ctx: Dict[str, Any]):
        self.cfg, self.rl, self.engine, self.loader = cfg, cfg.rl, engine, loader
        self.rank, self.world_size, self.sink = ctx["rank"], ctx["world_size"], ctx["sink"]
        self.batches = iter(loader)
        self.table: Optional[Dict] = None
        self.eval_table: Optional[Dict] = None
        self.reference: Optional[Reference] = Reference(cfg, engine, ctx["build_model"], reference_mode(cfg))
        self.flops = ModelFlops.of(engine.module)  # the reference's too: the same architecture
        self.train_passes = training_passes(cfg.model.trainable, cfg.lora)
        if self.rl.precompute_reference:
            self.table = self._reference_table(None, REFERENCE_TABLE)
            if self.rl.eval_pairs:
                self.eval_table = self._reference_table(self.rl.eval_pairs, "eval_" + REFERENCE_TABLE)
            self.reference.close()
            self.reference = None

    def _reference_table(self, shards: Optional[List[str]], name: str) -> Dict:
        """{pair: (reference log p(chosen), log p(rejected))} of every pair of the training data (or of
        `shards`), the same on every rank; computed by each rank for its share (the reference gathered once:
        ranks may have different numbers of batches), then exchanged. Kept in RUN_DIR/`name`, so a resume
        reads it instead."""
        path = Path(self.cfg.run_dir) / name
        if path.is_file():
            saved = load_plain(path)
            return {(d, int(p)): (float(c), float(r)) for (d, p), (c, r) in zip(saved["pairs"], saved["values"].tolist())}
        table: Dict = {}
        frozen = self.reference.frozen
        with torch.no_grad(), gathered(frozen if frozen is not None else self.engine) as module:
            for batch in one_pass(self.cfg, self.rank, self.world_size, shards):
                lp = self._sequence_logprobs(module, batch, reference=frozen is None)
                pairs = _halves(batch)
                for pair, c, r in zip(_pair_ids(batch), lp[:pairs].tolist(), lp[pairs:].tolist()):
                    table[pair] = (c, r)
        table = _gather_table(table, self.world_size)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"pairs": list(table), "values": torch.tensor(list(table.values()), dtype=torch.float64)},
                           tmp)
        self.sink.message(f"reference log-probabilities of {len(table)} pairs computed; the reference model is "
                          f"released")
        return table

    def _sequence_logprobs(self, module, batch: Dict[str, Any], reference: bool) -> torch.Tensor:
        """Summed answer log-probabilities [2B] from a whole (gathered) module, outside DeepSpeed."""
        from train.engine import model_inputs
        from train.lora import adapters_disabled
        from contextlib import nullcontext

        inputs = model_inputs(batch, self.engine.device, self.engine.compute_dtype)
        was_training = module.training
        module.eval()
        try:
            with adapters_disabled(module) if reference else nullcontext():
                out = module(**inputs, token_logprobs=True)
        finally:
            module.train(was_training)
        mask = answer_mask(batch).to(out.token_logprobs.device)
        return L.sequence_logprobs(out.token_logprobs, mask).double().cpu()

    def step(self, step: int) -> StepResult:
        cfg, engine = self.cfg, self.engine
        tokens, audio_s, stats, flops = 0, 0.0, {}, 0.0
        gas = cfg.engine.grad_accum_steps
        wait = 0.0
        for _ in range(gas):
            t0 = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t0
            pairs = _halves(batch)
            out = engine.forward(batch, token_logprobs=True)
            mask = answer_mask(batch).to(out.token_logprobs.device)
            seq = L.sequence_logprobs(out.token_logprobs, mask)
            if self.table is not None:
                try:
                    ref = torch.tensor([self.table[p] for p in _pair_ids(batch)], dtype=torch.float32)
                except KeyError as e:
                    raise RuntimeError(f"pair {e.args[0]} has no precomputed reference log-probability (the pair "
                                       f"shards changed since {REFERENCE_TABLE} was written?)") from None
                ref = ref.to(seq.device)
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                ref_seq = L.sequence_logprobs(self.reference.logprobs(batch), mask)
                ref_chosen, ref_rejected = ref_seq[:pairs], ref_seq[pairs:]
                flops += self.flops.forward(batch)
            loss, st = L.dpo_loss(seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, self.rl.beta,
                                  self.rl.label_smoothing)
            if self.rl.sft_coef:
                chosen_tokens = mask[:pairs].sum().clamp(min=1)
                loss = loss + self.rl.sft_coef * -(seq[:pairs].sum() / chosen_tokens)
            engine.backward_and_step(loss)
            flops += self.flops.train(batch, self.train_passes)
            for name, value in {"loss": loss.detach(), **st}.items():
                stats[name] = stats.get(name, 0.0) + value / gas
            tokens += batch["num_tokens"]
            audio_s += float(batch["num_audio_s"])
            del out
        return StepResult(tokens, stats, audio_s, wait, flops)

    def evaluate(self, tag: str) -> Dict[str, float]:
        """Held-out rl.eval_pairs: the share of pairs whose implicit reward ranks the chosen answer first."""
        if not self.rl.eval_pairs:
            return {}
        margins: Dict = {}
        with torch.no_grad(), gathered(self.engine) as module:
            ref_module = self.reference.module() if self.reference is not None else None
            for batch in one_pass(self.cfg, self.rank, self.world_size, self.rl.eval_pairs):
                pairs = _halves(batch)
                lp = self._sequence_logprobs(module, batch, reference=False)
                if self.eval_table is not None:
                    ref_lp = torch.tensor([self.eval_table[p] for p in _pair_ids(batch)], dtype=torch.float64)
                    ref_lp = torch.cat([ref_lp[:, 0], ref_lp[:, 1]])
                else:
                    ref_lp = self._sequence_logprobs(ref_module or module, batch, reference=ref_module is None)
                margin = (lp[:pairs] - ref_lp[:pairs]) - (lp[pairs:] - ref_lp[pairs:])
                margins.update(zip(_pair_ids(batch), margin.tolist()))  # (a pair seen twice counts once)
        right, total = sum(m > 0 for m in margins.values()), len(margins)
        counts = torch.tensor([right, total], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(counts)
        return {"pairwise_accuracy": float(counts[0] / counts[1].clamp(min=1))}

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()


class RewardModelStep(Algorithm):
    """A score model trained with the Bradley-Terry loss on pairs: the score read at each answer's last token."""

    def __init__(self, cfg: TrainConfig, engine: Engine, loader, ctx: Dict[str, Any]):
        self.cfg, self.rl, self.engine, self.loader = cfg, cfg.rl, engine, loader
        self.rank, self.world_size = ctx["rank"], ctx["world_size"]
        self.batches = iter(loader)
        self.flops = ModelFlops.of(engine.module)  # a score model: no lm_head
        self.train_passes = training_passes(cfg.model.trainable, cfg.lora)

    @staticmethod
    def scores(values_BT: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        last = L.last_token_index(answer_mask(batch)).to(values_BT.device)
        return last_token_scores(values_BT, last)

    def step(self, step: int) -> StepResult:
        tokens, audio_s, stats, flops = 0, 0.0, {}, 0.0
        gas = self.cfg.engine.grad_accum_steps
        wait = 0.0
        for _ in range(gas):
            t0 = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t0
            pairs = _halves(batch)
            out = self.engine.forward(batch)
            s = self.scores(out.scores, batch)
            loss, st = L.bradley_terry_loss(s[:pairs], s[pairs:], self.rl.center_coef)
            self.engine.backward_and_step(loss)
            flops += self.flops.train(batch, self.train_passes)
            for name, value in {"loss": loss.detach(), **st}.items():
                stats[name] = stats.get(name, 0.0) + value / gas
            tokens += batch["num_tokens"]
            audio_s += float(batch["num_audio_s"])
            del out
        return StepResult(tokens, stats, audio_s, wait, flops)

    def evaluate(self, tag: str) -> Dict[str, float]:
        """Held-out rl.eval_pairs: pairwise accuracy (score of the chosen answer above the rejected one)."""
        if not self.rl.eval_pairs:
            return {}
        from train.engine import model_inputs

        margins: Dict = {}
        with torch.no_grad(), gathered(self.engine) as module:
            was_training = module.training
            module.eval()
            for batch in one_pass(self.cfg, self.rank, self.world_size, self.rl.eval_pairs):
                pairs = _halves(batch)
                values = module(**model_inputs(batch, self.engine.device, self.engine.compute_dtype)).scores
                s = self.scores(values, batch)
                margins.update(zip(_pair_ids(batch), (s[:pairs] - s[pairs:]).tolist()))
            module.train(was_training)
        right, total = sum(m > 0 for m in margins.values()), len(margins)
        counts = torch.tensor([right, total], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(counts)
        return {"pairwise_accuracy": float(counts[0] / counts[1].clamp(min=1))}
