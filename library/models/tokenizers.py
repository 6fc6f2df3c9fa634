"""Offline CLIP tokenizers for SD1 / SD2 / SDXL (spec cli-options §2, dataset-config §8.1).

Nothing here needs the model hub. A tokenizer comes from, in order: a Diffusers folder's own
`tokenizer/` (`tokenizer_2/`), sd-scripts' `--tokenizer_cache_dir` layout, or the BPE vocabulary
that open_clip_torch ships (`open_clip/bpe_simple_vocab_16e6.txt.gz`), which is the vocabulary of
every CLIP text encoder used by SD1/SD2/SDXL.

Two deliberate behaviours (both make our ids equal open_clip's, the tokenizer the text encoders
were trained with):
* Text is cleaned as open_clip / OpenAI CLIP do (ftfy, HTML unescape twice, whitespace, Python
  `lower()`); transformers 5 dropped that step, so "“quoted”", "ＡＢＣ", "ﬁ", "&amp;" and Greek
  final sigma would otherwise tokenize differently. transformers 4 (sd-scripts v0.8.7) ran ftfy but
  not `html.unescape`; they differ only when the text also holds a literal `<` (ftfy then leaves
  entities alone): "a &lt;b&gt; <i>" -> ours and open_clip "a <b> <i>", transformers 4 "a &lt;b&gt; <i>".
* Pad `!` (SD2, SDXL tokenizer 2) is set by id only, so a literal `!` in a prompt stays a normal
  word piece (256 `!</w>`, 748 `!!</w>`). A folder that *declares* pad `!` makes transformers treat
  `!` as a special token and encode every `!` in the text as id 0 (diffusers issue #4153); sd-scripts
  v0.8.7 has that quirk for SD2 (not for SDXL, where it sets `pad_token_id = 0` afterwards).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import logging
import os
import re

from transformers import CLIPTokenizer

from library.errors import UserError
from library.fileio import atomic_path

logger = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")

# Fixed hub ids (spec cli-options §2); the cache folder is the id with "/" -> "_".
_HUB_SD1 = "openai/clip-vit-large-patch14"
_HUB_SD2 = "stabilityai/stable-diffusion-2"
_HUB_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
# Per family: (hub id, Diffusers subfolder, forced pad or None = keep the folder's pad) per tokenizer.
_SOURCES = {
    "sd1": [(_HUB_SD1, "tokenizer", None)],
    "sd2": [(_HUB_SD2, "tokenizer", "!")],
    "sdxl": [(_HUB_SD1, "tokenizer", None), (_HUB_BIGG, "tokenizer_2", "!")],
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
_MISSING_OPEN_CLIP = "the CLIP vocabulary comes from open_clip_torch: pip install --no-deps open-clip-torch"


@functools.lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocab (49408 entries) and BPE merges built exactly as open_clip's `SimpleTokenizer.__init__`."""
    # find_spec locates the package without importing it: open_clip's __init__ needs torchvision.
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [os.path.join(d, "bpe_simple_vocab_16e6.txt.gz") for d in folders]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise UserError(_MISSING_OPEN_CLIP)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's vocabulary order."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = [b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of `_bytes_to_unicode`: its characters are the printable bytes first, then the others."""
    chars = _bytes_to_unicode()
    printable = [ord(c) for c in chars if ord(c) < 256]
    others = [b for b in range(256) if b not in set(printable)]
    return dict(zip(chars, printable + others))


def token_text(tokenizer: CLIPTokenizer, token_id: int) -> str:
    """One token id as text, as transformers v4's slow `CLIPTokenizer.convert_tokens_to_string` wrote it (what
    sd-scripts printed): byte characters back to UTF-8 (broken sequences -> U+FFFD), `</w>` -> a space, stripped."""
    token = tokenizer.convert_ids_to_tokens([token_id])[0]
    decoder = _byte_decoder()
    raw = bytearray(decoder[c] for c in token if c in decoder)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def clean_text(text: str) -> str:
    """open_clip's `_clean_lower`: ftfy.fix_text, html.unescape twice, collapse whitespace, lower().

    Cached: captions repeat every epoch and ftfy is the slow part of tokenizing.
    """
    import ftfy  # start-up: a core requirement, but slow to import and only needed to tokenize

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class FtfyCLIPTokenizer(CLIPTokenizer):
    """transformers' CLIPTokenizer plus the text cleaning its v4 slow version and open_clip apply.

    As in transformers 4, the text is first split on added tokens (special tokens, Textual Inversion
    words), which are kept verbatim; only the text between them is cleaned.
    """

    def _encode_plus(self, text=None, text_pair=None, **kwargs):
        if not kwargs.get("is_split_into_words"):
            text, text_pair = self._clean(text), self._clean(text_pair)
        return super()._encode_plus(text=text, text_pair=text_pair, **kwargs)

    def _clean(self, text):
        if isinstance(text, (list, tuple)):
            return [self._clean(t) for t in text]
        if not isinstance(text, str):
            return text
        parts = self._added_token_pattern().split(text)
        # Odd positions are the captured added tokens; a space keeps neighbours apart after cleaning.
        return " ".join(p if i % 2 else clean_text(p) for i, p in enumerate(parts) if p.strip())

    def _added_token_pattern(self) -> re.Pattern:
        tokens = tuple(sorted(self.added_tokens_encoder, key=len, reverse=True))
        cached = getattr(self, "_pattern_cache", None)
        if cached is None or cached[0] != tokens:
            cached = (tokens, re.compile("(" + "|".join(map(re.escape, tokens)) + ")" if tokens else "(?!)"))
            self._pattern_cache = cached
        return cached[1]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain `CLIPTokenizer` folder, with vocab.json/merges.txt for transformers 4 readers."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = os.path.join(save_directory, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["tokenizer_class"] = "CLIPTokenizer"  # loaders elsewhere know no FtfyCLIPTokenizer
        vocab, merges = _backend_vocab_and_merges(self)
        outputs = {
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            # HF's merges.txt starts with this header line; readers skip it.
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        }
        for name, text in outputs.items():
            with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
                f.write(text)
        return tuple(files) + tuple(os.path.join(save_directory, n) for n in ("vocab.json", "merges.txt"))


def _backend_vocab_and_merges(tok: CLIPTokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model's own vocab and merges (added tokens excluded)."""
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    # CLIPTokenizer keeps the merges it was built from (a list of pairs, or a merges.txt path when read
    # from one); serialising the backend is the slow, always-right fallback.
    merges = getattr(tok, "_merges", None)
    if not (isinstance(merges, list) and merges and all(isinstance(m, tuple) and len(m) == 2 for m in merges)):
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return vocab, merges


def _make(vocab: dict[str, int], merges, pad: str, extra_tokens: list | None = None) -> FtfyCLIPTokenizer:
    """Build the tokenizer; pad is set by id afterwards so it never becomes a split token (module doc)."""
    tok = FtfyCLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LENGTH)
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    if pad != EOS:
        pad_id = tok.convert_tokens_to_ids(pad)
        if pad_id is None or tok.convert_ids_to_tokens(pad_id) != pad:
            raise ValueError(f"pad token {pad!r} is not in the vocabulary")
        tok.pad_token_id = pad_id
    return tok


def build_clip_tokenizer(pad: str = "eos") -> FtfyCLIPTokenizer:
    """CLIP ViT-L/14 tokenizer from open_clip's BPE file; pad "eos" (SD1, SDXL-1) or "!" (SD2, SDXL-2)."""
    if pad not in ("eos", "!"):
        raise ValueError(f"pad must be 'eos' or '!', not {pad!r}")
    vocab, merges = _clip_vocabulary()
    return _make(vocab, merges, EOS if pad == "eos" else "!")


def _load_folder(folder: str, forced_pad: str | None) -> FtfyCLIPTokenizer:
    """Read a tokenizer folder (transformers 4 or 5 layout) and rebuild it as our tokenizer.

    Rebuilding keeps the folder's vocabulary, merges, pad and Textual Inversion words but drops a
    declared pad `!` from the special tokens (module doc).
    """
    try:
        loaded = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        vocab, merges = _backend_vocab_and_merges(loaded)
        # Textual Inversion words and the like; tokens of the BPE vocabulary (BOS, EOS, `!`) are not extra.
        extra = [t for _, t in sorted(loaded.added_tokens_decoder.items()) if str(t) not in vocab]
        return _make(vocab, merges, forced_pad or str(loaded.pad_token or EOS), extra)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, JSONDecodeError...)
        raise UserError(f"cannot read the tokenizer folder {folder}: {e}") from e


def load_tokenizers(
    family: str, model_path: str | None = None, tokenizer_cache_dir: str | None = None
) -> list[FtfyCLIPTokenizer]:
    """Tokenizers for a model family: [tok] for sd1/sd2, [tok1, tok2] for sdxl (spec cli-options §2).

    Priority per tokenizer: (1) `<model_path>/tokenizer[_2]` of a Diffusers folder (its text encoder's
    vocabulary may differ); (2) `<tokenizer_cache_dir>/<hub id, "/" -> "_">` (sd-scripts' layout);
    (3) built from open_clip's vocabulary, then saved to the cache folder when one is given.
    SD2 and SDXL tokenizer 2 always pad with `!` (id 0), as sd-scripts forces for SDXL-2.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    tokenizers = []
    for hub_id, subfolder, forced_pad in _SOURCES[family]:
        own = os.path.join(model_path, subfolder) if model_path and os.path.isdir(model_path) else None
        cached = os.path.join(tokenizer_cache_dir, hub_id.replace("/", "_")) if tokenizer_cache_dir else None
        if own and os.path.isdir(own):
            logger.info(f"tokenizer from the model folder: {own}")
            tok = _load_folder(own, forced_pad)
        elif cached and os.path.exists(cached):
            logger.info(f"tokenizer from the cache: {cached}")
            tok = _load_folder(cached, forced_pad)
        else:
            tok = build_clip_tokenizer("!" if forced_pad == "!" else "eos")
            if cached:
                _save_cache(tok, cached)
        tokenizers.append(tok)
    return tokenizers


def _save_cache(tok: FtfyCLIPTokenizer, folder: str) -> None:
    """sd-scripts saves a freshly made tokenizer to `--tokenizer_cache_dir` for later offline runs."""
    try:
        with atomic_path(folder) as tmp:  # a killed run leaves no half-written cache folder
            tok.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"cannot write the tokenizer cache folder {folder}: {e}") from e
    logger.info(f"tokenizer saved to the cache: {folder}")


def save_tokenizers(tokenizers: list, folder: str) -> None:
    """Write `tokenizer/` (and `tokenizer_2/`) of a Diffusers folder."""
    if not 1 <= len(tokenizers) <= 2:
        raise ValueError(f"expected 1 or 2 tokenizers, got {len(tokenizers)}")
    for tok, sub in zip(tokenizers, ("tokenizer", "tokenizer_2")):
        tok.save_pretrained(os.path.join(folder, sub))
