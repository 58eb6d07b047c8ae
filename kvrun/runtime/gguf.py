"""GGUF (llama.cpp) → HF-style directory for the Llama family: dequantized weights, config, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (llama only)")
    config = _hf_config(meta, reader)
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape([int(d) for d in reversed(tensor.shape)])
        name = _hf_name(tensor.name)
        # llama.cpp stores Q and K rows interleaved for its rotary layout; HF uses the rotate-half layout.
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, num_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, num_kv_heads)
        tensors[name] = weight.contiguous()
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(gguf_path, out_dir)


def _hf_config(meta: dict, reader) -> dict:
    prefix = "llama."
    hidden = int(meta[prefix + "embedding_length"])
    num_heads = int(meta[prefix + "attention.head_count"])
    vocab = meta.get(prefix + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    token_field = reader.fields.get
    bos = token_field("tokenizer.ggml.bos_token_id")
    eos = token_field("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta[prefix + "feed_forward_length"]),
        "num_hidden_layers": int(meta[prefix + "block_count"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(prefix + "attention.head_count_kv", num_heads)),
        "head_dim": int(meta.get(prefix + "rope.dimension_count", hidden // num_heads)),
        "rms_norm_eps": float(meta[prefix + "attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(prefix + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(prefix + "context_length", 2048)),
        "vocab_size": int(vocab),
        "bos_token_id": int(bos.contents()) if bos else None,
        "eos_token_id": int(eos.contents()) if eos else None,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "name_or_path": meta.get("general.name", ""),
    }


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
