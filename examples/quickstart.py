"""The main job, small: personalise a tiny Llama for 16 users in mixed-user batches.

Builds a random Llama from a config (no download), patches its FFN projections with
ProperLinear (4 group experts, a user-aware and a LoRA-aware router, a rank-4 LoRA per
user), trains a few steps with every user in the same batch, then saves the adapters,
loads them into a fresh copy of the base model and checks that it answers the same.

    python examples/quickstart.py [--steps 30] [--out DIR]
"""

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import proper


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="where to save the adapters (default: a temp dir)")
    args = ap.parse_args()

    num_users, seq_len = 16, 12
    cfg = proper.ProperConfig(num_experts=4, top_k=2, rank=8, alpha=16.0, user_rank=4, user_alpha=8.0,
                              num_users=num_users, router=("token", "user", "lora"),
                              target_modules=["gate_proj", "up_proj", "down_proj"])
    model = proper.patch_model(tiny_llama(), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"patched {len(proper.proper_layers(model))} layers; trainable parameters: "
          f"{sum(p.numel() for p in trainable):,}")

    # Each user repeats a token pattern of their own: the user LoRAs and routers must learn it.
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 128, (num_users, 3), generator=g)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for step in range(args.steps):
        users = torch.randint(0, num_users, (8,), generator=g)  # a mixed-user batch
        input_ids = patterns[users].repeat(1, seq_len // 3)
        with proper.user_context(model, users):
            out = model(input_ids=input_ids, labels=input_ids)
        aux = proper.aux_losses(model)
        loss = out.loss + 0.01 * aux["load_balance"] + 0.01 * aux["distinctness"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  lm loss {out.loss.item():.4f}  load balance {aux['load_balance'].item():.3f}")

    model.eval()
    users = torch.tensor([0, 5, -1])  # -1: a user the bank has never seen (group path only)
    input_ids = patterns[users.clamp(min=0)].repeat(1, 2)
    with torch.no_grad(), proper.user_context(model, users):
        logits = model(input_ids=input_ids).logits

    out_dir = args.out or tempfile.mkdtemp(prefix="proper-quickstart-")
    proper.save_adapters(model, out_dir)
    fresh = proper.load_adapters(tiny_llama(), out_dir)  # patches the fresh base and loads
    fresh.eval()
    with torch.no_grad(), proper.user_context(fresh, users):
        again = fresh(input_ids=input_ids).logits
    diff = (again - logits).abs().max().item()
    print(f"saved to {out_dir}; reloaded model max |diff| = {diff:.3g}")
    if diff != 0.0:
        raise SystemExit("reloaded adapters do not reproduce the outputs")


if __name__ == "__main__":
    main()
