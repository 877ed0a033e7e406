"""Test helpers for the server: uvicorn in a thread on a free port, and tiny random models on disk.

`tiny_models(root, tokenizer)` writes a 1-layer random Llama with SmolLM2's tokenizer (``base``) and a
random LoRA adapter on it (``adapter``, hermes format); `running(app)` serves an app until the block
ends.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free localhost port; yields the base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.stopping.set()
        srv.should_exit = True
        thread.join(timeout=30)


def tiny_models(root: Path, tokenizer, **config) -> dict[str, str]:
    """``{"tiny": adapter folder, "tiny-base": base folder}`` under `root`; `config` overrides the
    `LlamaConfig` (e.g. ``max_position_embeddings``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from calltune.formats import get_format, save_format

    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id), **config})
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"),
                             LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "adapter")
    save_format(get_format("hermes"), root / "adapter")
    return {"tiny": str(root / "adapter"), "tiny-base": str(root / "base")}
