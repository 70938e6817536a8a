"""retrain.train as the cycle runs it (a child process), on the tiny model: LoRA, QLoRA and full."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrain.train import EVENT, TrainSpec, batching, lora_config, sft_config, sft_trainer
from serve import adapters
from settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def data(path: Path, n: int, long_answer: int = 0) -> str:
    rows = [{"prompt": [{"role": "user", "content": f"Say the number {i}."}],
             "completion": [{"role": "assistant", "content": f"The number is {i}." + " and again" * long_answer * (i == 0)}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_in_child(spec: TrainSpec, tmp_path: Path) -> list[dict]:
    """Run retrain.train as the cycle does; its progress events, once it exited cleanly."""
    spec.dump(tmp_path / "spec.json")
    done = subprocess.run([sys.executable, "-m", "retrain.train", str(tmp_path / "spec.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line.split(EVENT, 1)[1]) for line in done.stdout.splitlines() if EVENT in line]


def test_spec_json_round_trips_the_training_config(tmp_path):
    spec = TrainSpec(base_model="m", train_file="t.jsonl", val_file=None, out_dir="out", preference_file="p.jsonl",
                     config=TrainConfig(r=4, target_modules="all-linear", num_train_epochs=0.5, preference_stage="kto"))
    spec.dump(tmp_path / "spec.json")
    assert TrainSpec.load(tmp_path / "spec.json") == spec and spec.config.peft_target_modules == "all-linear"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_child_process_trains_an_adapter_vllm_could_load(tiny_model, tmp_path, settings, method):
    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 16),
                     val_file=data(tmp_path / "val.jsonl", 4), out_dir=str(tmp_path / "out"),
                     config=TrainConfig(method=method, r=4, lora_alpha=8, num_train_epochs=2, per_device_train_batch_size=4,
                                        learning_rate=1e-3, max_length=64))
    events = train_in_child(spec, tmp_path)
    assert any("loss" in e for e in events) and any("eval_loss" in e for e in events)
    assert events[-1]["done"] and events[-1]["steps"] == 8
    assert {"batching": "padding-free"} in events  # every row fits max_length
    info = adapters.validate(tmp_path / "out" / "adapter", settings, str(tiny_model))
    assert info.rank == 4


def test_child_process_trains_every_weight_with_method_full(tiny_model, tmp_path, settings):
    """TRAIN__METHOD=full: the same trainer with no PEFT config; a whole model is saved with its tokenizer,
    a version vLLM loads as a model of its own (served blue-green: serve/fleet.py), and every weight moved."""
    from safetensors.torch import load_file

    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 16),
                     val_file=data(tmp_path / "val.jsonl", 4), out_dir=str(tmp_path / "out"),
                     config=TrainConfig(method="full", num_train_epochs=2, per_device_train_batch_size=4,
                                        full_learning_rate=1e-3, max_length=64))
    events = train_in_child(spec, tmp_path)
    assert events[-1]["done"] and events[-1]["steps"] == 8 and any("eval_loss" in e for e in events)
    out = tmp_path / "out" / "model"
    info = adapters.validate(out, settings, str(tiny_model))
    assert info.kind == "full" and not (tmp_path / "out" / "adapter").exists()
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(not before[k].equal(after[k]) for k in before)


def test_lora_training_moves_only_the_lora_weights(tiny_model, tmp_path):
    """As TRL's own SFT tests check, on tuneloop's trainer configuration: every base weight is unchanged and
    every LoRA weight moved (so the adapter is all that training produced, and all of it learned)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 16), val_file=None,
                     out_dir=str(tmp_path / "out"),
                     config=TrainConfig(r=4, lora_alpha=8, num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                        max_length=64))
    trainer = sft_trainer(gpu=False)(model=AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32),
                         args=sft_config(spec, gpu=False, has_val=False, steps_per_epoch=4),
                         train_dataset=load_dataset("json", data_files=spec.train_file, split="train"),
                         processing_class=AutoTokenizer.from_pretrained(spec.base_model), peft_config=lora_config(spec.config))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    lora = {n for n in before if "lora_" in n}
    assert lora and lora == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, old in before.items():
        moved = not torch.equal(old, trainer.model.get_parameter(name))
        assert moved == (name in lora), f"{name} {'moved' if moved else 'did not move'}"


@pytest.mark.parametrize("padding_free", [True, False])
def test_the_cpu_trainer_has_trls_loss_and_gradients(tiny_model, tmp_path, padding_free):
    """On CPU the LM head runs only where there is a label, and a padding-free batch's attention row by row
    (retrain.train.sft_trainer): on the same batches, padding-free or padded, the loss and the LoRA gradients
    are TRL's own (its fused LM head, transformers' SDPA over the whole batch under its block mask)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from retrain.train import PACKED

    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 8, long_answer=3), val_file=None,
                     out_dir=str(tmp_path / "out"), config=TrainConfig(r=4, lora_alpha=8, lora_dropout=0.0,  # the forwards must match
                                        per_device_train_batch_size=4, max_length=64))
    rows = load_dataset("json", data_files=spec.train_file, split="train")
    tok = AutoTokenizer.from_pretrained(spec.base_model)
    args = sft_config(spec, gpu=False, has_val=False, steps_per_epoch=2, **(batching(40, 64) if padding_free else {}))
    assert args.padding_free == padding_free
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, dtype=torch.float32, attn_implementation="sdpa")
    ours = sft_trainer(gpu=False)(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora_config(spec.config))
    trl = SFTTrainer(model=ours.model, args=args, train_dataset=rows, processing_class=tok)  # the same PEFT model
    assert type(ours) is not SFTTrainer and isinstance(ours, SFTTrainer)
    ours_attention = PACKED if padding_free else "sdpa"
    assert ours.model.config._attn_implementation == ours_attention
    with torch.no_grad():  # LoRA B starts at zero; move it so that the adapter's gradients all flow
        for name, p in ours.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batches = list(ours.get_train_dataloader())
    assert padding_free == (batches[0]["input_ids"].shape[0] == 1)  # rows laid end to end, or padded
    for batch in batches:
        found = []
        for trainer, attention in ((ours, ours_attention), (trl, "sdpa")):
            trainer.model.set_attn_implementation(attention)
            trainer.model.zero_grad()
            n = (batch["labels"][:, 1:] != -100).sum()
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
            loss.backward()
            found.append((loss.item(), {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}))
        (a, grads_a), (b, grads_b) = found
        assert a == pytest.approx(b, rel=1e-4)
        assert grads_a.keys() == grads_b.keys() and all(torch.allclose(grads_a[k], grads_b[k], rtol=1e-3, atol=1e-6) for k in grads_a)
        assert all(g.abs().sum() > 0 for g in grads_a.values())


def test_packed_attention_is_sdpa_under_the_block_mask():
    """Row by row equals one SDPA over the batch with each row attending causally to itself only."""
    import torch
    import torch.nn.functional as F

    from retrain.train import packed_attention

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    q, k, v = torch.randn(1, 4, 18, 8), torch.randn(1, 2, 18, 8), torch.randn(1, 2, 18, 8)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (row[:, None] == row[None, :]) & (positions[0][:, None] >= positions[0][None, :])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    got, _ = packed_attention(torch.nn.Module(), q, k, v, None, position_ids=positions, scaling=None)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_a_row_longer_than_max_length_falls_back_to_padded_batches_that_cut_it(tiny_model, tmp_path, settings):
    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 8, long_answer=100),
                     val_file=None, out_dir=str(tmp_path / "out"),
                     config=TrainConfig(r=4, lora_alpha=8, num_train_epochs=1, per_device_train_batch_size=4, max_length=64))
    events = train_in_child(spec, tmp_path)
    assert any(e.get("batching", "").startswith("padded (a row of") and "cut to 64" in e["batching"] for e in events)
    assert events[-1]["done"] and events[-1]["steps"] == 2
    adapters.validate(tmp_path / "out" / "adapter", settings, str(tiny_model))


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_stage_continues_the_adapter(tiny_model, tmp_path, settings, stage):
    from retrain.dataset import Item, dpo_rows, kto_rows

    items = [Item(i, [{"role": "user", "content": f"Say the number {i}."}], f"The number is {i}.", f"No idea {i}.", 1, "train", "feedback")
             for i in range(6)]
    rows = [r for it in items for r in (dpo_rows(it) if stage == "dpo" else kto_rows(it))]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 8), val_file=None,
                     out_dir=str(tmp_path / "out"), preference_file=str(tmp_path / "pref.jsonl"),
                     config=TrainConfig(r=4, lora_alpha=8, num_train_epochs=1, per_device_train_batch_size=4, max_length=64,
                                        preference_stage=stage))
    events = train_in_child(spec, tmp_path)
    assert {"stage": stage, "rows": len(rows)} in events
    adapters.validate(tmp_path / "out" / "adapter", settings, str(tiny_model))


def test_early_stopping_ends_a_run_whose_validation_loss_stopped_improving(tiny_model, tmp_path):
    """Validation several times per epoch, patience counted in evaluations: the run ends long before its last
    epoch once the validation loss stops falling (here it must rise: val answers contradict train's)."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say the number {i}."}],
                                       "completion": [{"role": "assistant", "content": f"Zebra {i * 7} quietly."}]}) + "\n"
                           for i in range(4)))
    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 16), val_file=str(val),
                     out_dir=str(tmp_path / "out"),
                     config=TrainConfig(r=4, lora_alpha=8, num_train_epochs=20, per_device_train_batch_size=4, learning_rate=1e-2,
                                        max_length=64, evals_per_epoch=2, early_stopping_patience=2))
    events = train_in_child(spec, tmp_path)
    evals = [e for e in events if "eval_loss" in e]
    assert events[-1]["done"] and events[-1]["steps"] < 80, events[-1]  # 20 epochs x 4 steps, stopped early
    assert len(evals) >= 3 and abs(events[-1]["best_eval_loss"] - min(e["eval_loss"] for e in evals)) < 1e-4  # the best was kept


def test_the_training_child_is_launched_plainly_or_through_accelerate(tmp_path):
    from retrain.train import launch_command

    spec = tmp_path / "spec.json"
    assert launch_command(spec, 1, "", gpus=0) == [sys.executable, "-m", "retrain.train", str(spec)]
    ddp = launch_command(spec, 4, "", gpus=4)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp and ddp[-3:] == ["-m", "retrain.train", str(spec)]
    assert ddp[ddp.index("--num_processes") + 1] == "4"
    configured = launch_command(spec, 1, "/etc/acc.yaml", gpus=0)
    assert configured[configured.index("--config_file") + 1] == "/etc/acc.yaml" and "--multi_gpu" not in configured
    assert "--num_processes" not in configured  # the file's own count stands
    assert launch_command(spec, 2, "/etc/acc.yaml", gpus=2)[-5:-3] == ["--num_processes", "2"]
    with pytest.raises(ValueError, match="TUNELOOP_ACCELERATE_PROCESSES=2 needs 2 GPUs and this host has 0"):
        launch_command(spec, 2, "", gpus=0)


def test_a_child_started_through_accelerate_launch_trains_and_reports_once(tiny_model, tmp_path):
    """The `accelerate launch` path for real, on CPU with one process (a config file selects it): the adapter is
    saved and each progress event is reported once, as by the plain child."""
    from retrain.train import launch_command

    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n"
                      "mixed_precision: 'no'\nnum_machines: 1\nmachine_rank: 0\n")
    spec = TrainSpec(base_model=str(tiny_model), train_file=data(tmp_path / "train.jsonl", 8), val_file=None,
                     out_dir=str(tmp_path / "out"), config=TrainConfig(r=4, lora_alpha=8, num_train_epochs=1,
                                                                        per_device_train_batch_size=4, max_length=64))
    spec.dump(tmp_path / "spec.json")
    command = launch_command(tmp_path / "spec.json", 1, str(config), gpus=0)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line.split(EVENT, 1)[1]) for line in done.stdout.splitlines() if EVENT in line]
    assert [e["step"] for e in events if "loss" in e] == [1, 2] and sum("done" in e for e in events) == 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
