"""Policy models without a model hub: a locally trained tokenizer and models built from a config.

``train_tokenizer(texts)`` trains a byte-level BPE on the environments' own text with the
Qwen3 chat template and its special tokens. ``random_model(shape, tokenizer)`` builds a randomly
initialised Qwen3-architecture causal LM of a named shape (``tiny`` for CPU tests, the others
with the layer shapes of the published Qwen3 checkpoints; the vocabulary is the local
tokenizer's). ``load_policy(config)`` resolves a ``TrainConfig``'s model and tokenizer.

Only transformers, tokenizers and torch are imported here (no datasets, trl or prefect), so the
GPU benchmark can build models on a machine that has little else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from awm_core.errors import SettingsError

# The chat template's role and tool markers. im_end doubles as the end of every policy turn.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added as ordinary (non-special) tokens, as in Qwen3: decoding with skip_special_tokens keeps
# them, so a generated <tool_call> block survives into the reply text the loop parses.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
EOS = "<|im_end|>"
PAD = "<|endoftext|>"

# Layer shapes (hidden, intermediate, layers, heads, kv heads, head dim). The published Qwen3
# checkpoints share these; the vocabulary comes from the tokenizer in use.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
}


def chat_template() -> str:
    """The Qwen3 chat template as TRL ships it (TRL recognises this exact string)."""
    try:
        import trl
    except ImportError:  # the GPU benchmark may run without trl on the import path yet
        return _FALLBACK_TEMPLATE
    path = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    return path.read_text() if path.exists() else _FALLBACK_TEMPLATE


# Used only when trl is not importable: the same rendering for system/user/assistant/tool.
_FALLBACK_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on ``texts``, with the chat template; saved when ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes plus merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) or [" "], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left")
    fast.chat_template = chat_template()
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    """Reload a saved tokenizer. ``AutoTokenizer`` would pick a class from the model config and
    change the ids, so the fast class is named explicitly."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise SettingsError(f"no tokenizer at {path} (tokenizer.json missing)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = chat_template()
    return tok


def model_config(shape: str, tokenizer: Any, *, max_positions: int = 32768):
    from transformers import Qwen3Config

    if shape not in SHAPES:
        raise SettingsError(f"unknown model shape {shape!r}; shapes: {', '.join(SHAPES)}")
    return Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
                       bos_token_id=None, tie_word_embeddings=True, rope_theta=1_000_000.0, **SHAPES[shape])


def random_model(shape: str, tokenizer: Any, *, seed: int = 0, dtype: Any = None, max_positions: int = 32768):
    """A randomly initialised Qwen3-architecture causal LM of ``shape`` for ``tokenizer``, in fp32
    unless ``dtype`` says otherwise (training keeps fp32 weights: see ``load_model``)."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(model_config(shape, tokenizer, max_positions=max_positions))
    model = model.to(dtype if dtype is not None else torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path: str | Path, *, dtype: Any = None):
    """A saved model folder, in fp32 unless ``dtype`` says otherwise.

    transformers 5 loads in the dtype the folder was saved in (``dtype="auto"``), so a bf16
    checkpoint would come back bf16 and AdamW steps of ~1e-6 would round away; fp32 is asked for
    explicitly. Compute in bf16 is autocast (``TrainConfig.bf16``), not the weights' dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise SettingsError(f"model folder {path} not found or has no config.json; set `model` to a saved "
                            "model folder or random:<shape>")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else torch.float32)


def corpus(environments: Iterable[Any]) -> list[str]:
    """Text to train a tokenizer on: system prompts, tasks, tool names, descriptions and schemas."""
    import json

    from awm_core.agent.interfaces import CALL_TOOL, LIST_TOOLS, function_tool
    from awm_core.agent.loop import SYSTEM_PROMPTS
    from awm_core.agent.policies import tools_system_block

    texts = list(SYSTEM_PROMPTS.values())
    for env in environments:
        texts += [t.text for t in env.tasks]
        if env.api_spec is not None:
            # The tools exactly as the policy's system prompt shows them.
            texts.append(tools_system_block([function_tool(t.name, t.description, t.json_schema())
                                             for t in env.api_spec.tools]))
        for s in env.solutions:
            texts += [json.dumps({"name": c.tool, "arguments": c.arguments}) for c in s.calls]
            if s.final_answer:
                texts.append(s.final_answer)
    texts.append(tools_system_block([LIST_TOOLS, CALL_TOOL]))
    return texts
