"""Tiny byte-level BPE tokenizers (``tokenizers``-made ``tokenizer.json`` + config) for the tiny
checkpoints of ``extmind.tiny_models``: Llama 3 style, ChatML (Qwen) and BERT WordPiece-style
special tokens, trained on a small English corpus so tokens stay readable. Chat templates:
Llama 3 headers, ChatML (Qwen2), ChatML with Qwen3's ``enable_thinking`` switch, Mistral ``[INST]``."""

from __future__ import annotations

import json
from pathlib import Path

# A small English corpus so the BPE merges look like words (tokens stay readable in citations).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A memory is a record of what a model read.
Extended mind attention lets every layer retrieve the keys and values it needs from a store.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
The river flows to the sea, and the sea rises into clouds that rain on the mountains again.
Machine learning models turn text into vectors; similar meanings land close to each other.
Alice met Bob at the station at noon. They talked about music, books, weather and trains.
In 1969 people walked on the moon. Water boils at one hundred degrees Celsius at sea level.
def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024
"""

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|pad|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_SPECIALS = [*QWEN_SPECIALS, "<think>", "</think>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's: ChatML; with enable_thinking=False the generation prompt carries an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral / Mixtral Instruct: a system message is folded into the next user turn; the
# generation prompt is the closing [/INST] itself.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}[INST] {{ ns.system }}{{ message['content'] }} [/INST]"
    "{% set ns.system = '' %}{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def added_tokens_decoder(ids: dict[str, int], specials) -> dict:
    """``tokenizer_config.json``'s ``added_tokens_decoder``: each special token, matched whole."""
    return {
        str(ids[t]): {
            "content": t,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for t in specials
    }


def train_byte_level_bpe(corpus, vocab_size: int, specials: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 / Llama 3 / Qwen style: no prefix space)
    trained on ``corpus`` (an iterable of texts), ``specials`` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tokenizer(path, kind: str = "llama", vocab_size: int = 512) -> dict:
    """Trains a deterministic tokenizer on the built-in corpus and writes HF tokenizer files.

    kind: "llama" (byte-level BPE, BOS added), "qwen3" (byte-level BPE, no BOS, ChatML),
    "qwen3_thinking" (as qwen3, with <think> tokens and Qwen3's thinking switch in the template),
    "mistral" (byte-level BPE, <s> added, [INST] template) or "bert" (uncased WordPiece,
    [CLS] ... [SEP]). Returns {"vocab_size", "bos", "eos", "pad", ...} ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = [line for line in _CORPUS.splitlines() if line] * 4
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=BERT_SPECIALS,
            initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-"),
        )
        tok.train_from_iterator(corpus, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.save(str(path / "tokenizer.json"))
        _write_json(
            path / "tokenizer_config.json",
            {
                "tokenizer_class": "BertTokenizerFast",
                "do_lower_case": True,
                "model_max_length": 512,
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "mask_token": "[MASK]",
            },
        )
        _write_json(
            path / "special_tokens_map.json",
            {
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "mask_token": "[MASK]",
            },
        )
        return {"vocab_size": tok.get_vocab_size(), "pad": tok.token_to_id("[PAD]"), "cls": cls, "sep": sep}

    specials = {"llama": LLAMA_SPECIALS, "qwen3_thinking": QWEN3_SPECIALS, "mistral": MISTRAL_SPECIALS}.get(
        kind, QWEN_SPECIALS
    )
    tok = train_byte_level_bpe(corpus, vocab_size, specials)
    ids = {t: tok.token_to_id(t) for t in specials}
    if kind == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])]
        )
        cfg = {
            "bos_token": bos,
            "eos_token": "<|eot_id|>",
            "pad_token": "<|pad|>",
            "chat_template": LLAMA_CHAT_TEMPLATE,
        }
        info = {
            "bos": ids[bos],
            "eos": ids["<|eot_id|>"],
            "eos_ids": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            "pad": ids["<|pad|>"],
        }
    elif kind in ("qwen3", "qwen3_thinking"):
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": QWEN_CHAT_TEMPLATE if kind == "qwen3" else QWEN3_CHAT_TEMPLATE,
        }
        info = {
            "bos": None,
            "eos": ids["<|im_end|>"],
            "eos_ids": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad": ids["<|endoftext|>"],
            "endoftext": ids["<|endoftext|>"],
        }
    elif kind == "mistral":
        bos = "<s>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])]
        )
        cfg = {"bos_token": bos, "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL_CHAT_TEMPLATE}
        info = {"bos": ids[bos], "eos": ids["</s>"], "eos_ids": [ids["</s>"]], "pad": ids["<unk>"]}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use llama, qwen3, qwen3_thinking, mistral or bert")
    tok.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 131072,
            "added_tokens_decoder": added_tokens_decoder(ids, specials),
            **cfg,
        },
    )
    _write_json(path / "special_tokens_map.json", {k: v for k, v in cfg.items() if k.endswith("_token") and v})
    info["vocab_size"] = tok.get_vocab_size()
    return info
