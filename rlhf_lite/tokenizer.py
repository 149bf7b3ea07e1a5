"""The world's word-level tokenizer, trained locally with the `tokenizers` library.

The paper's models use LLaMA's tokenizer; our from-scratch CPU profile needs a tiny vocabulary instead,
and nothing may be downloaded. Design:

* Word level: every space-separated word (punctuation included) is one token. Words are pre-tokenized
  with ``Metaspace(prepend_scheme="never")``, so each vocabulary entry carries its leading space
  ("▁plus"). World text always puts a space before a word (``"\\n\\nAssistant: 3 plus ..."``), so decoding
  restores the text exactly and a response decoded alone keeps its leading space, as in HH-RLHF.
* The turn markers ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"`` are single (non-special) added tokens,
  matched before pre-tokenization, so a prompt and its response tokenize the same apart or together.
* Special tokens ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2; markers = 3, 4; then words by frequency.
  No post-processor: callers append ``<eos>`` themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["EOS", "MARKERS", "PAD", "SPECIAL_TOKENS", "UNK", "load_tokenizer", "save_tokenizer",
           "train_tokenizer"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)
MARKERS: tuple[str, ...] = ("\n\nHuman:", "\n\nAssistant:")
_SPACE = "▁"
_FILE = "tokenizer.json"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)


def _word_order(texts: Iterable[str]) -> list[str]:
    """Vocabulary words ("▁word") in the trainer's order (frequency, then alphabetical), markers removed."""
    counter = Tokenizer(models.WordLevel(unk_token=UNK))
    counter.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))

    def no_markers() -> Iterable[str]:
        for text in texts:
            for marker in MARKERS:  # markers become added tokens below; keep them out of the word list
                text = text.replace(marker, " ")
            yield text

    counter.train_from_iterator(no_markers(), trainer=trainer)
    vocab = counter.get_vocab()
    words = sorted((w for w in vocab if w not in SPECIAL_TOKENS), key=vocab.__getitem__)
    return [w for w in words if w != _SPACE]  # a lone "▁" only comes from double spaces


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Train the word-level tokenizer on ``texts`` (all world text); deterministic for the same texts.

    The vocabulary is built explicitly (specials, markers, trained words) so the ids of the added
    marker tokens and of the model vocabulary agree once saved and reloaded by `transformers`.
    """
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *MARKERS, *_word_order(texts)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, lstrip=False, rstrip=False, single_word=False)
                    for t in MARKERS])
    return tok


def _file(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a directory."""
    p = Path(path)
    return p / _FILE if p.is_dir() else p


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tok`` as tokenizer.json (``path`` is the file or its directory); returns the file path."""
    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(file), pretty=True)
    return file


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load tokenizer.json (the file or a directory holding it) as a `transformers` fast tokenizer.

    Left padding, so a batch of prompts ends at the same position for generation.
    """
    file = _file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer file at {file}")
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                       padding_side="left", clean_up_tokenization_spaces=False)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        if type(e) is not Exception and not isinstance(e, ValueError):
            raise
        raise ValueError(f"{file} is not a valid tokenizer file (corrupt or truncated?): {e}") from e
