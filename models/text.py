"""Frozen text encoders of text-to-image DiTs, and the embeddings they hand the DiT.

    encoder = build_text_encoder(cfg.model.text, device)     # frozen, eval mode, no gradients
    text = encoder(["a handwritten digit seven", ""])        # TextEmbeddings, batch 2
    model(x, t, None, text=text)                              # a text-conditioned DiT

`model.text.encoder` selects the encoder:
- `clip` / `t5`: transformers' `CLIPTextModel` / `T5EncoderModel` and their tokenizer, loaded with
  `from_pretrained(model.text.path, local_files_only=True)` (never a download);
- `tiny_clip` / `tiny_t5`: the same architectures, 2 layers of width `model.text.dim` (64 when 0),
  randomly initialised from fixed per-parameter seeds (the same weights in every process, no
  file), with a byte-level tokenizer (`byte_tokenizer`) built in memory. For tests and the
  quickstart: a frozen random encoder still maps different captions to different token states,
  which the DiT's cross-attention learns to read.

What an encoder returns per caption (the same as `make_shards captions --text-encoder` stores):
the last layer's token states padded to `model.text.max_length` with a mask of the real tokens
(padding states are zero), and a pooled vector -- CLIP's pooler output (the end-of-text token),
for T5 the mean over the real tokens. The encoder never becomes part of the DiT (checkpoints, EMA
and optimizer never see it). transformers is imported only when an encoder is built.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # models/ sits below engine/: the config is passed in, never imported at run time
    from engine.config import TextConfig

TEXT_ENCODERS = ("clip", "t5", "tiny_clip", "tiny_t5")
TINY_WIDTH = 64  # width of the tiny encoders when model.text.dim is 0
TINY_LAYERS = 2
TINY_HEADS = 2
# Byte-level vocabulary of the tiny encoders: 4 special tokens, then byte b has id BYTE_OFFSET + b.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")
PAD_ID, BOS_ID, UNK_ID, EOS_ID = range(4)
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_VOCAB = BYTE_OFFSET + 256


class TextEncoderError(ValueError):
    """A text-encoder problem; the message names the config key or folder to fix."""


@dataclass
class TextEmbeddings:
    """Frozen-encoder outputs for a batch of captions (what a text-conditioned DiT takes as `text`)."""

    tokens: torch.Tensor  # [B, L, D] last-layer token states, zero on padding
    mask: torch.Tensor  # [B, L] bool, True on real tokens (every row has at least one)
    pooled: torch.Tensor  # [B, D] pooled caption vector

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        """Moved (and floats cast); the mask stays bool."""
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.mask.to(device),
                              self.pooled.to(device=device, dtype=dtype))

    def expand_to(self, batch: int) -> TextEmbeddings:
        """A batch-1 embedding (e.g. the empty prompt) repeated `batch` times; others must already match."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"text embeddings of batch {len(self)} cannot be expanded to batch {batch}")
        return TextEmbeddings(self.tokens.expand(batch, -1, -1), self.mask.expand(batch, -1),
                              self.pooled.expand(batch, -1))

    def where(self, keep: torch.Tensor, other: TextEmbeddings) -> TextEmbeddings:
        """Row i from self where keep[i], else from `other` (batch 1 or the same batch)."""
        other = other.expand_to(len(self))
        k = keep.to(self.tokens.device, torch.bool)
        return TextEmbeddings(torch.where(k[:, None, None], self.tokens, other.tokens),
                              torch.where(k[:, None], self.mask, other.mask),
                              torch.where(k[:, None], self.pooled, other.pooled))

    def __getitem__(self, rows: slice | torch.Tensor) -> TextEmbeddings:
        return TextEmbeddings(self.tokens[rows], self.mask[rows], self.pooled[rows])

    @staticmethod
    def cat(parts: list[TextEmbeddings]) -> TextEmbeddings:
        lengths = {p.tokens.shape[1] for p in parts}
        if len(lengths) != 1:
            raise ValueError(f"cannot concatenate text embeddings of different lengths {sorted(lengths)}")
        return TextEmbeddings(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                              torch.cat([p.pooled for p in parts]))


# --------------------------------------------------------------------------------------------
# Tokenizer and weights of the tiny encoders
# --------------------------------------------------------------------------------------------


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character of every byte (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(max_length: int) -> Any:
    """A transformers fast tokenizer over UTF-8 bytes: <bos> bytes... <eos>, id of byte b = 4 + b.

    Built in memory (no vocabulary file, no download); any prompt tokenizes, nothing is unknown,
    and `save_pretrained` writes a folder that `AutoTokenizer` loads back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: BYTE_OFFSET + b for b, char in _byte_to_char().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_encoder_config(kind: str, width: int, max_length: int) -> Any:
    """transformers config of `tiny_clip` / `tiny_t5` (2 layers, 2 heads, byte vocabulary)."""
    if width % TINY_HEADS:
        raise TextEncoderError(f"model.text.dim: the tiny encoders have {TINY_HEADS} heads, {width} is not divisible")
    if kind == "tiny_clip":
        from transformers import CLIPTextConfig

        return CLIPTextConfig(vocab_size=BYTE_VOCAB, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS,
                              max_position_embeddings=max_length, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                              eos_token_id=EOS_ID)
    if kind == "tiny_t5":
        from transformers import T5Config

        return T5Config(vocab_size=BYTE_VOCAB, d_model=width, d_kv=width // TINY_HEADS, d_ff=2 * width,
                        num_layers=TINY_LAYERS, num_heads=TINY_HEADS, relative_attention_num_buckets=8,
                        feed_forward_proj="gated-gelu", pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                        decoder_start_token_id=PAD_ID)
    raise TextEncoderError(f"model.text.encoder: {kind!r} is not a tiny encoder ('tiny_clip', 'tiny_t5')")


def init_tiny_weights(model: nn.Module, kind: str) -> None:
    """Each parameter from its own generator seeded by (kind, parameter name): weights that do not
    depend on the global RNG, on the construction order, or on transformers' own init code.
    Linear weights N(0, 1/fan_in), embedding tables N(0, 1), norm scales 1, biases 0."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            digest = hashlib.blake2b(f"{kind}/{name}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
            std = 1.0 if id(p) in embeddings else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


class FrozenTextEncoder(nn.Module):
    """Tokenizer + transformers text model, frozen: captions -> `TextEmbeddings` (float32)."""

    def __init__(self, model: nn.Module, tokenizer: Any, is_clip: bool, max_length: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.is_clip = is_clip
        self.max_length = max_length

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size if self.is_clip else self.model.config.d_model)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)  # frozen: dropout stays off whatever the caller does

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEmbeddings:
        if isinstance(captions, str):
            raise TypeError("FrozenTextEncoder takes a list of captions, not one string")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        states = out.last_hidden_state.float() * mask[..., None]
        if self.is_clip:
            pooled = out.pooler_output.float()
        else:
            pooled = states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextEmbeddings(states, mask, pooled)


def _pretrained_width(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "clip":  # a full CLIP folder: its text tower
        config = config.get("text_config", {})
    width = config.get("hidden_size", config.get("d_model"))
    if not isinstance(width, int):
        raise TextEncoderError(f"model.text.path: {path / 'config.json'} names no hidden_size / d_model")
    return width


def _check_pretrained_folder(text: TextConfig) -> Path:
    if not text.path:
        raise TextEncoderError(f"model.text.path: empty; model.text.encoder={text.encoder} loads a local "
                               "transformers folder (config.json + weights + tokenizer)")
    path = Path(text.path)
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"model.text.path: {path} has no config.json (expected a transformers "
                               f"{'CLIPTextModel' if text.encoder == 'clip' else 'T5EncoderModel'} folder)")
    return path


def text_width(text: TextConfig) -> int:
    """Width D of the encoder's token states: `model.text.dim`, else the tiny width or the folder's config."""
    if text.encoder not in TEXT_ENCODERS:
        raise TextEncoderError(f"model.text.encoder: {text.encoder!r} is not a text encoder ({', '.join(TEXT_ENCODERS)})")
    if text.dim:
        return text.dim
    if text.encoder.startswith("tiny_"):
        return TINY_WIDTH
    return _pretrained_width(_check_pretrained_folder(text))


def build_text_encoder(text: TextConfig, device: torch.device | str = "cpu") -> FrozenTextEncoder:
    """The frozen encoder of `model.text` on `device` (bf16 weights on CUDA for the pretrained ones)."""
    width = text_width(text)
    if text.encoder.startswith("tiny_"):
        from transformers import CLIPTextModel, T5EncoderModel

        config = tiny_encoder_config(text.encoder, width, text.max_length)
        with torch.random.fork_rng(devices=[]):  # transformers' init would consume the global RNG
            model = (CLIPTextModel if text.encoder == "tiny_clip" else T5EncoderModel)(config)
        init_tiny_weights(model, text.encoder)
        tokenizer = byte_tokenizer(text.max_length)
    else:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = _check_pretrained_folder(text)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model_class = CLIPTextModel if text.encoder == "clip" else T5EncoderModel
        try:
            model = model_class.from_pretrained(path, local_files_only=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(text.tokenizer or path, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:  # ImportError: a slow-only tokenizer without its package
            raise TextEncoderError(f"model.text.path: cannot load {model_class.__name__} / tokenizer from "
                                   f"{text.tokenizer or path}: {str(e).splitlines()[0]}") from None
        if text.encoder == "clip" and text.max_length > model.config.max_position_embeddings:
            raise TextEncoderError(f"model.text.max_length={text.max_length} exceeds the CLIP text model's "
                                   f"{model.config.max_position_embeddings} positions")
    encoder = FrozenTextEncoder(model, tokenizer, text.encoder in ("clip", "tiny_clip"), text.max_length)
    if encoder.width != width:
        raise TextEncoderError(f"model.text.dim={text.dim} but the encoder in {text.path} has width {encoder.width}")
    return encoder.to(device)
