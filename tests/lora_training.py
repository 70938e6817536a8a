"""Train a small LoRA adapter with PEFT in-process, for tests that need one that really learned."""

from __future__ import annotations

from pathlib import Path


def train_lora(base: str, out: Path, pairs: list[tuple[str, str]], steps: int = 30, r: int = 8, lr: float = 3e-3) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    batches = []
    for prompt, answer in pairs:
        chat = [{"role": "user", "content": prompt}]
        p = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
        labels = [-100] * len(p) + full[len(p):]  # learn the answer, not the question
        batches.append((torch.tensor([full]), torch.tensor([labels])))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out
