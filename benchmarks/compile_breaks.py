"""How often does `torch.compile` break the graph of a sparsified model's training forward?

Each graph break splits the compiled model into pieces that are compiled (and fused) apart. This counts
them with `torch._dynamo.explain` on one training forward (loss included) of small GPT-2 and Llama models
built from configs, dense and after `nm_hf.sparsify` with SR-STE 2:4, and prints one line per model.

Run: `python benchmarks/compile_breaks.py` (CPU, about a minute).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import nm_hf

CONFIGS = {
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
}


def graph_breaks(model: torch.nn.Module, ids: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (2, 8))
    print(f"torch {torch.__version__} | graph breaks in one compiled training forward")
    for model_type in args.models.split(","):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type])).train()
        dense = graph_breaks(model, ids)
        nm_hf.sparsify(model, nm_hf.SparsityConfig(method="sr-ste", decay=0.5))
        layers = len(list(nm_hf.iter_sparse_layers(model)))
        print(f"{model_type}: dense {dense} | sr-ste 2:4 {graph_breaks(model, ids)} ({layers} sparse layers)")


if __name__ == "__main__":
    main()
