"""The output layer fused with its loss: mean cross-entropy, or token log-probabilities, of chosen hidden rows
through lm_head, chunk by chunk, so the [rows, vocab] logits never exist whole.

The mean loss has one scalar upstream gradient, so its gradients are computed in the forward pass and
backward only scales them: no logits are recomputed and the weight gradient is one buffer, filled in place
chunk after chunk. Token log-probabilities (RL) get a gradient per token, which the weight gradient needs
before it can sum over rows (or every row's [vocab] softmax would have to be kept); they keep each row's
log-sum-exp instead and recompute the logits chunk by chunk in backward, into one weight-gradient buffer too.
Either way lm_head runs once, through its own forward (so its hooks run once: ZeRO-3 gathers the weight once
per forward, peft merges its trainable rows), with its linear map computed by the fusion.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import torch
from torch import nn

# Logits per chunk (rows x vocab), per device type. A chunk's logits take rows / hidden of the weight
# gradient's memory; fewer rows make each weight-gradient update (a matmul summing over the chunk's rows,
# reading and writing all of [vocab, hidden]) less efficient. CPU, 2 threads, fp32, 1024 rows through a
# 39680 x 3584 head: chunks of 211 rows took 1.14x the CPU time of one chunk, 422 1.06x, 640 1.03x; 2**26
# logits are 422 rows of the mini's 158720 vocabulary. A GPU's update is bandwidth-bound below roughly
# 600 rows (bf16, H100: ~300 flop/byte needed, rows / 2 given), hence 845 there (estimated, not measured).
CHUNK_LOGITS = {"cpu": 2**26}
ACCELERATOR_CHUNK_LOGITS = 2**27
# A chunk whose weight is not fp32 stays in that dtype; its softmax runs in fp32 blocks of 1/8 of its logits
# (fewer blocks would cost memory, more would cost kernel launches on a GPU).
FP32_BLOCKS_PER_CHUNK = 8


def _chunk_logits(device: torch.device) -> int:
    return CHUNK_LOGITS.get(device.type, ACCELERATOR_CHUNK_LOGITS)


def chunk_rows(vocab: int, device: torch.device, max_rows: int) -> int:
    """Rows per chunk: at most max_rows, and at most the device's logits budget over the vocabulary."""
    return max(1, min(int(max_rows), _chunk_logits(device) // vocab))


def _block_rows(vocab: int, device: torch.device) -> int:
    """Rows of one fp32 block (see FP32_BLOCKS_PER_CHUNK)."""
    return max(1, _chunk_logits(device) // FP32_BLOCKS_PER_CHUNK // vocab)


def linear_cross_entropy(lm_head: nn.Module, hidden_MH: torch.Tensor, rows_N: torch.Tensor, targets_N: torch.Tensor,
                         scale: float = 1.0, max_chunk_rows: int = 1024, row_losses: bool = False):
    """scale * sum over i of cross_entropy(lm_head(hidden_MH[rows_N[i]]), targets_N[i]): an fp32 scalar,
    logits in fp32. Only the rows_N rows are computed, and only they get a gradient (the others' is 0).

    With no rows it is 0, still connected to hidden_MH and the weight (their gradients are zeros).
    row_losses=True returns (that scalar, each row's cross-entropy [N]): fp32, detached, unscaled, the very
    values the scalar sums (per-task losses of a mixture are sums of them); [N] floats more, no logits more."""
    grad_on = torch.is_grad_enabled()

    def fused(input_MH: torch.Tensor, weight_VH: torch.Tensor):
        rows = chunk_rows(weight_VH.shape[0], input_MH.device, max_chunk_rows)
        loss, losses_N = _LinearCrossEntropy.apply(input_MH, weight_VH, rows_N, targets_N, float(scale), rows,
                                                   grad_on and input_MH.requires_grad,
                                                   grad_on and weight_VH.requires_grad, row_losses)
        return (loss, losses_N) if row_losses else loss

    return call_with_linear(lm_head, hidden_MH, fused)


def linear_token_logprobs(lm_head: nn.Module, hidden_MH: torch.Tensor, rows_N: torch.Tensor, targets_N: torch.Tensor,
                          temperature: float = 1.0, max_chunk_rows: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets_N[i]) [N], entropy [N]), both fp32, of softmax(lm_head(hidden_MH[rows_N[i]]) /
    temperature) in fp32; the entropy is detached. Backward recomputes the logits chunk by chunk."""

    def fused(input_MH: torch.Tensor, weight_VH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = chunk_rows(weight_VH.shape[0], input_MH.device, max_chunk_rows)
        return _LinearTokenLogprobs.apply(input_MH, weight_VH, rows_N, targets_N, float(temperature), rows)

    return call_with_linear(lm_head, hidden_MH, fused)


def call_with_linear(lm_head: nn.Module, hidden: torch.Tensor, fused: Callable):
    """lm_head(hidden), with the torch.nn.functional.linear(input, weight) call its forward makes computed by
    fused(input, weight) instead, and its result returned.

    The module's own call runs, hooks and all, exactly once; the weight it passes is the effective one (a
    peft layer's merged rows) and is gathered under ZeRO-3 for that call; the gradient fused gives the
    weight reaches the parameter through autograd, where ZeRO-3's reduce-scatter hooks wait for it.
    functional.linear is swapped for the call's duration (DeepSpeed's ZeRO-3 swaps it for good, so a torch
    function mode would not see the call); only this thread's call is taken."""
    import torch.nn.functional as F

    original = F.linear
    owner = threading.get_ident()
    taken = []

    def linear(input, weight, bias=None):
        if threading.get_ident() != owner:
            return original(input, weight, bias)
        if taken:
            raise ValueError(f"lm_head ({type(lm_head).__name__}) called torch.nn.functional.linear more than "
                             f"once in one forward; the fused loss expects one linear map")
        if bias is not None:
            raise ValueError(f"lm_head ({type(lm_head).__name__}) has a bias; the fused loss expects none")
        if input.dtype != weight.dtype:
            raise ValueError(f"lm_head input dtype {input.dtype} differs from its weight's {weight.dtype}")
        taken.append(True)
        return fused(input, weight)

    F.linear = linear
    try:
        out = lm_head(hidden)
    finally:
        F.linear = original
    if not taken:
        raise ValueError(f"lm_head ({type(lm_head).__name__}) did not call torch.nn.functional.linear; the "
                         f"fused loss needs an nn.Linear (or a layer wrapping one, as peft's)")
    return out


def _workspace(weight_VH: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """The fp32 block a chunk's softmax runs in, allocated once per pass: None for an fp32 weight (its
    chunks are fp32 already and are worked on in place)."""
    if weight_VH.dtype == torch.float32:
        return None
    vocab = weight_VH.shape[0]
    return torch.empty(min(rows, _block_rows(vocab, weight_VH.device)), vocab, dtype=torch.float32,
                       device=weight_VH.device)


def _fp32_blocks(logits_CV: torch.Tensor, workspace: Optional[torch.Tensor], bounded: bool = False):
    """(rows, fp32 logits of those rows) pairs covering the chunk: views of an fp32 chunk (all of it at
    once unless bounded), else the rows copied into the workspace (_write_back puts them back)."""
    if workspace is not None:
        step = workspace.shape[0]
    else:
        step = _block_rows(logits_CV.shape[1], logits_CV.device) if bounded else logits_CV.shape[0]
    for start in range(0, logits_CV.shape[0], step):
        rows = slice(start, start + step)
        if workspace is None:
            yield rows, logits_CV[rows]
        else:
            part = logits_CV[rows]
            yield rows, workspace[:part.shape[0]].copy_(part)


def _write_back(logits_CV: torch.Tensor, rows: slice, z: torch.Tensor, workspace: Optional[torch.Tensor]) -> None:
    if workspace is not None:
        logits_CV[rows].copy_(z)


def _cross_entropy_chunk_(logits_CV, targets_C, grad_scale: Optional[float], workspace,
                          losses_C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the rows' cross-entropies (fp32), each row's also written to losses_C when given; with
    grad_scale, overwrites logits_CV with grad_scale * (softmax - onehot(target)), the gradient of
    grad_scale * that sum."""
    total = torch.zeros((), dtype=torch.float32, device=logits_CV.device)
    for rows, z in _fp32_blocks(logits_CV, workspace):
        t = targets_C[rows, None]
        z_target = z.gather(1, t)
        peak = z.amax(1, keepdim=True)
        sums = z.sub_(peak).exp_().sum(1, keepdim=True)  # z now holds exp(z - max)
        losses_R1 = peak + sums.log() - z_target
        total += losses_R1.sum()
        if losses_C is not None:
            losses_C[rows] = losses_R1.squeeze(1)
        if grad_scale is not None:
            z.mul_(grad_scale / sums).scatter_add_(1, t, z.new_full(t.shape, -grad_scale))
            _write_back(logits_CV, rows, z, workspace)
    return total


def _logprob_chunk(logits_CV, targets_C, temperature: float, lse_C, logprob_C, entropy_C, workspace) -> None:
    """Fills each row's log-sum-exp, log p(target) and entropy of softmax(logits / temperature)."""
    for rows, z in _fp32_blocks(logits_CV, workspace, bounded=True):  # bounded: exp is a temporary
        if temperature != 1.0:
            z.div_(temperature)
        z_target = z.gather(1, targets_C[rows, None]).squeeze(1)
        peak = z.amax(1)
        shifted = z.sub_(peak[:, None])
        exp = shifted.exp()
        sums = exp.sum(1)
        lse_C[rows] = peak + sums.log()
        logprob_C[rows] = z_target - lse_C[rows]
        # entropy = lse - sum(p * z) = log(sums) - sum(exp * shifted) / sums
        entropy_C[rows] = sums.log() - torch.linalg.vecdot(exp, shifted) / sums


def _logprob_grad_chunk_(logits_CV, targets_C, temperature: float, lse_C, coef_C, workspace) -> None:
    """Overwrites logits_CV with coef * (onehot(target) - softmax(logits / temperature)) per row, from the
    log-sum-exp that forward kept; coef is the row's upstream gradient over the temperature."""
    for rows, z in _fp32_blocks(logits_CV, workspace):
        if temperature != 1.0:
            z.div_(temperature)
        coef = coef_C[rows, None]
        z.sub_(lse_C[rows, None]).exp_().mul_(-coef).scatter_add_(1, targets_C[rows, None], coef)
        _write_back(logits_CV, rows, z, workspace)


def _accumulate(grad_CV, hidden_CH, weight_VH, dh_CH: Optional[torch.Tensor], dW_VH: Optional[torch.Tensor],
                grad_weight: bool) -> Optional[torch.Tensor]:
    """dh_CH = grad_CV @ W (when given); returns dW_VH (+)= grad_CV^T @ hidden_CH, or None without
    grad_weight. The first chunk allocates the one weight-gradient buffer, the others add to it in place."""
    if dh_CH is not None:
        torch.mm(grad_CV, weight_VH, out=dh_CH)
    if not grad_weight:
        return None
    if dW_VH is None:
        return torch.mm(grad_CV.t(), hidden_CH)
    return dW_VH.addmm_(grad_CV.t(), hidden_CH)


def _scatter_rows(dh_NH: torch.Tensor, rows_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The gradient of all num_rows hidden rows: dh_NH at rows_N, 0 elsewhere."""
    return dh_NH.new_zeros(num_rows, dh_NH.shape[1]).index_copy_(0, rows_N, dh_NH)


class _LinearCrossEntropy(torch.autograd.Function):
    """(scale * sum of cross-entropies, each row's cross-entropy [N] or [0] without row_losses); forward also
    computes the gradients (times scale), backward scales them."""

    @staticmethod
    def forward(ctx, hidden_MH, weight_VH, rows_N, targets_N, scale, rows, grad_hidden, grad_weight, row_losses):
        total = torch.zeros((), dtype=torch.float32, device=hidden_MH.device)
        want_grads = grad_hidden or grad_weight
        N = rows_N.shape[0]
        losses_N = torch.empty(N if row_losses else 0, dtype=torch.float32, device=hidden_MH.device)
        dh_NH = hidden_MH.new_empty(N, hidden_MH.shape[1]) if grad_hidden else None
        dW_VH = None
        workspace = _workspace(weight_VH, rows)
        for start in range(0, N, rows):
            at = slice(start, start + rows)
            hidden_CH = hidden_MH.index_select(0, rows_N[at])
            logits_CV = torch.mm(hidden_CH, weight_VH.t())
            total += _cross_entropy_chunk_(logits_CV, targets_N[at], scale if want_grads else None, workspace,
                                           losses_N[at] if row_losses else None)
            if want_grads:
                dW_VH = _accumulate(logits_CV, hidden_CH, weight_VH, None if dh_NH is None else dh_NH[at], dW_VH,
                                    grad_weight)
            del logits_CV  # before the next chunk's logits exist
        if grad_weight and dW_VH is None:  # no rows: the weight still gets its (zero) gradient
            dW_VH = torch.zeros_like(weight_VH)
        ctx.grads = (dh_NH, dW_VH)
        ctx.save_for_backward(rows_N)
        ctx.num_rows = hidden_MH.shape[0]
        ctx.mark_non_differentiable(losses_N)
        return total * scale, losses_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses):
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through the fused loss (its gradients are handed out once)")
        dh_NH, dW_VH = ctx.grads
        ctx.grads = None  # no reference left: autograd may keep dW_VH as the parameter's .grad, uncopied
        dh_MH = None
        if dh_NH is not None:
            (rows_N,) = ctx.saved_tensors
            dh_MH = _scatter_rows(dh_NH.mul_(grad_loss), rows_N, ctx.num_rows)
        if dW_VH is not None:
            dW_VH = dW_VH.mul_(grad_loss)
        return dh_MH, dW_VH, None, None, None, None, None, None, None


class _LinearTokenLogprobs(torch.autograd.Function):
    """(log p(target), entropy) per row at a temperature; backward recomputes the logits per chunk."""

    @staticmethod
    def forward(ctx, hidden_MH, weight_VH, rows_N, targets_N, temperature, rows):
        N = rows_N.shape[0]
        logprob_N, entropy_N, lse_N = (torch.empty(N, dtype=torch.float32, device=hidden_MH.device)
                                       for _ in range(3))
        workspace = _workspace(weight_VH, rows)
        for start in range(0, N, rows):
            at = slice(start, start + rows)
            logits_CV = torch.mm(hidden_MH.index_select(0, rows_N[at]), weight_VH.t())
            _logprob_chunk(logits_CV, targets_N[at], temperature, lse_N[at], logprob_N[at], entropy_N[at],
                           workspace)
            del logits_CV  # before the next chunk's logits exist
        ctx.save_for_backward(hidden_MH, weight_VH, rows_N, targets_N, lse_N)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(entropy_N)
        return logprob_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprob_N, _grad_entropy):
        hidden_MH, weight_VH, rows_N, targets_N, lse_N = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        grad_hidden, grad_weight = ctx.needs_input_grad[:2]
        N = rows_N.shape[0]
        dh_NH = hidden_MH.new_empty(N, hidden_MH.shape[1]) if grad_hidden else None
        dW_VH = None
        # d log p(y) / d logits = (onehot(y) - softmax) / temperature, times each row's upstream gradient
        coef_N = grad_logprob_N.float() / temperature
        workspace = _workspace(weight_VH, rows)
        for start in range(0, N, rows):
            at = slice(start, start + rows)
            hidden_CH = hidden_MH.index_select(0, rows_N[at])
            logits_CV = torch.mm(hidden_CH, weight_VH.t())
            _logprob_grad_chunk_(logits_CV, targets_N[at], temperature, lse_N[at], coef_N[at], workspace)
            dW_VH = _accumulate(logits_CV, hidden_CH, weight_VH, None if dh_NH is None else dh_NH[at], dW_VH,
                                grad_weight)
            del logits_CV  # before the next chunk's logits exist
        if grad_weight and dW_VH is None:
            dW_VH = torch.zeros_like(weight_VH)
        dh_MH = None if dh_NH is None else _scatter_rows(dh_NH, rows_N, hidden_MH.shape[0])
        return dh_MH, dW_VH, None, None, None, None
