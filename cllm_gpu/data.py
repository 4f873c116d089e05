"""Token data on disk (docs/design.md): a directory with train.bin, val.bin (flat little-endian
uint16 or uint32 token ids) and meta.json. Memory-mapped, never loaded whole."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import sys
import sysconfig
import threading
import time
import unicodedata
from pathlib import Path
from secrets import token_hex

import numpy as np

try:
    import fcntl  # POSIX: the renaming lock below; elsewhere the renames go unlocked
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from .backend import HostMemory, available_memory, format_bytes
from .errors import ConfigError, DataError, refuse_a_file_for_a_directory
from .json_text import parse_json, to_json

META_VERSION = 1
DEFAULT_CORPUS_BYTES = 2_000_000
MAX_BPE_VOCAB = 1 << 24  # far past any real vocabulary; 2**30 aborts the BPE trainer
ENCODE_BATCH_CHARS = 1 << 16  # the documents a Hugging Face tokenizer encodes at once
WRITE_CHUNK_TOKENS = 1 << 20  # the token ids prepare writes (and counts) at once
# the characters of one document a Hugging Face tokenizer encodes, or the BPE trainer reads, at
# once, where the document can be cut there (document_pieces): the library holds some 500
# bytes a token of what it is given, so a 20 MB text file given whole took 3 to 4 GB
ENCODE_PIECE_CHARS = 1 << 16
# the library's peak growth a token of a document given whole, for the note saying so: 456
# to 580 measured (640,000 and 2.2 million characters of Python's source, Metaspace without
# its split, Llama 2's legacy normalizer, GPT-2's kind with Strip); 210 to 280 for CJK text,
# whose tokens are short. A character costs 100 to 630 bytes, so no figure a character
# fits: 240 said 153.6 MB for 640,000 characters that grew the peak by 67 MB, or by 404 MB
WHOLE_DOCUMENT_BYTES_PER_TOKEN = 500
# how often a prepare says what it is doing (_Progress): it said nothing until it was done, 102 s
# for 100 MB of text with `bpe` on 2 cores, some 17 minutes a gigabyte
PROGRESS_SECONDS = 10.0


def token_dtype(vocab_size: int):
    """How token ids are stored (docs/design.md): uint16, uint32 when the vocabulary exceeds
    65,535."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


# ------------------------------------------------------------------ tokenizers
EOT_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token; how decode() shows end-of-text


class ByteTokenizer:
    """Bytes are tokens: ids 0..255, no dependency, lossless for any text. eot_id (256 in data
    prepared with documents; None in data prepared before) is a reserved id after the bytes."""
    name = "byte"
    EOT_ID = 256

    def __init__(self, eot_id: int | None = EOT_ID):
        if eot_id not in (None, self.EOT_ID):
            raise DataError(f"meta.json: the byte tokenizer's eot_id is {self.EOT_ID}, "
                            f"got {eot_id!r}")
        self.eot_id = eot_id
        self.vocab_size = 256 if eot_id is None else 257
        self.unused_ids = np.zeros(0, dtype=np.int64)  # every id below vocab_size is a token

    def encode(self, text: str) -> np.ndarray:
        """A prompt's ids: its UTF-8 bytes, the text <|endoftext|> as end-of-text (as the
        BPE tokenizers' prompts and the tokenizer.json export writes, which transformers
        loads); a document's text stays bytes (encode_documents)."""
        if self.eot_id is None:
            return self._bytes(text)
        parts = [self._bytes(p) for p in text.split(EOT_TEXT)]
        eot = np.array([self.eot_id], dtype=np.uint16)
        return np.concatenate([x for p in parts for x in (eot, p)][1:])

    @staticmethod
    def _bytes(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Bytes as UTF-8 (invalid sequences replaced); end-of-text shown as <|endoftext|>.
        An id past the vocabulary is refused: taken modulo 256 it would print another byte."""
        pieces, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(_not_in_vocabulary(self.name, i, self.vocab_size))
            if i == self.eot_id:
                pieces += [run.decode("utf-8", errors="replace"), EOT_TEXT]
                run = bytearray()
            else:
                run.append(i)
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def encode_documents(self, docs: list[str], done=None, log=None) -> list[np.ndarray]:
        """Documents are text: the text <|endoftext|> in one stays its 13 bytes. Each as uint8,
        one byte a token: prepare holds every document's ids at once. done: called with the
        characters encoded so far after each document. (log: HFTokenizer's; bytes need no
        note.)"""
        ids, chars = [], 0
        for d in docs:
            ids.append(np.frombuffer(d.encode("utf-8"), dtype=np.uint8))
            chars += len(d)
            if done is not None:
                done(chars)
        return ids

    def to_hf_json(self) -> str | None:
        """The same tokenizer as a Hugging Face tokenizer.json (for export): byte-level
        pre-tokenization maps each byte to one character (GPT-2's byte-to-unicode table), a
        BPE without merges maps that character to the byte's value, and end-of-text is the
        special token <|endoftext|> at 256. None without the `tokenizers` package."""
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            return None
        tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_gpt2_byte_chars())},
                                   merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        if self.eot_id is not None:
            tok.add_special_tokens([EOT_TEXT])  # the next id: 256
        return tok.to_str()


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet, indexed by byte: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


# a cut candidate: a character that is no white space, then a space or a newline (the
# character's Unicode category is checked after: Python's \s is not the regex library's)
_CUT_CANDIDATE = {starts: re.compile(f"[^\\s](?=[{starts}])") for starts in (" \n", " ")}


def document_pieces(text: str, starts: str | None = " \n"):
    r"""The document `text` as consecutive pieces of ENCODE_PIECE_CHARS characters or more
    (the last fewer), each cut just before a space or a newline (`starts`: which; None: not
    cut; piece_starts says which for a tokenizer) that follows a letter, mark, number,
    punctuation or symbol (white space in no definition). GPT-2's byte-level pre-tokenizer
    splits text with a regex with no look-behind ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
    ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+): no word it finds holds such a character and the white
    space after it, and either side alone gives the words the whole gives there (white space
    ending a text is read otherwise: \s+(?!\S) takes a run of it whole; no piece but the
    document's last ends in it). A document with no such place (one long word) is one
    piece."""
    if starts is None or len(text) <= ENCODE_PIECE_CHARS:
        yield text
        return
    candidates, start = _CUT_CANDIDATE[starts], 0
    while len(text) - start > ENCODE_PIECE_CHARS:
        cut = next((m.end() for m in candidates.finditer(text, start + ENCODE_PIECE_CHARS)
                    if unicodedata.category(m[0])[0] in "LMNPS"), None)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


# the regexes of tokenizers that split words with a Split pre-tokenizer, then map them to
# bytes (ByteLevel without its own regex): Llama 3's (GPT-4's cl100k) and Qwen2's. As GPT-2's,
# neither finds a word holding a character that is no white space and the space after it, nor
# reads either side of that place alone otherwise; but a newline may end a word of
# punctuation ([^\s\p{L}\p{N}]+[\r\n]*: ".\n"), so they are cut before a space only
_SPLIT_REGEXES_CUT_AT_A_SPACE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)


# normalizers that change a text a character at a time (Lowercase, StripAccents: marks
# removed, BertNormalizer: controls removed, white space made a space, accents, CJK spaced,
# lowercased) or bring it to a Unicode normal form, which never composes or reorders across a
# space or a newline (starters that compose with nothing): a text cut before one is
# normalized as the whole is, the white space kept, for the pre-tokenizers below
_NORMALIZERS_KEEPING_WHITE_SPACE_CUTS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase",
                                         "StripAccents", "BertNormalizer"}
# pre-tokenizers that end every word at white space (Rust's, which holds a space and a
# newline) and read nothing past it: any cut before a space or a newline gives each side
# the words the whole gives there. (Metaspace, split: each word but a text's first begins
# at a space made '▁' and holds no other; a newline is no space to it, so it is cut before a
# space only. Its prepend_scheme puts '▁' before a text that starts with none: no piece but
# the first starts with none.)
_WHITE_SPACE_PRE_TOKENIZERS = {"WhitespaceSplit": " \n", "Whitespace": " \n",
                               "BertPreTokenizer": " \n", "Metaspace": " "}
# pre-tokenizers that split a word by what it holds alone: after a white space one in a
# Sequence (each step splits each word of the one before by itself), the words still end
# at white space
_WORD_SPLITTERS = {"WhitespaceSplit", "Whitespace", "BertPreTokenizer", "Punctuation", "Digits"}


def _white_space_starts(pre: dict) -> str | None:
    """_WHITE_SPACE_PRE_TOKENIZERS' cut for a pre-tokenizer's JSON, or one of them but
    Metaspace followed by _WORD_SPLITTERS in a Sequence; None for any other."""
    kind = pre.get("type")
    if kind == "Metaspace":
        return " " if pre.get("split") is True else None
    steps = pre.get("pretokenizers") if kind == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        return None
    first = steps[0].get("type")
    if first == "Metaspace" or not all(s.get("type") in _WORD_SPLITTERS for s in steps[1:]):
        return None
    return _WHITE_SPACE_PRE_TOKENIZERS.get(first)


def piece_starts(tok) -> str | None:
    """Where a document may be cut for the library tokenizer `tok` (document_pieces'
    `starts`), for a model that encodes each word alone (every model the library has) and no
    added token found in documents (special ones are not: encode_special_tokens): " \\n" for
    GPT-2's byte-level pre-tokenizer (ByteLevel with its regex; " " alone where it puts a
    space before a text that starts with none: add_prefix_space), " " for Llama 3's and
    Qwen2's (_SPLIT_REGEXES_CUT_AT_A_SPACE); with no normalizer, or NFC (a space or newline
    is a character no composition or reordering crosses). " \\n" for WhitespaceSplit,
    Whitespace and BERT's pre-tokenizer (also first in a Sequence of _WORD_SPLITTERS:
    Punctuation, Digits), " " for Metaspace with its split (SentencePiece's
    '\u2581' for a space), each with no normalizer or those of
    _NORMALIZERS_KEEPING_WHITE_SPACE_CUTS (NFKC, BERT's). None (documents encoded whole) for
    any other tokenizer (whole_document_reason says why)."""
    return _piece_rule(tok)[0]


def whole_document_reason(tok) -> str | None:
    """Why piece_starts finds no cut for `tok`, in words (None: it finds one)."""
    return _piece_rule(tok)[1]


def _piece_rule(tok):
    """(piece_starts' answer, None) or (None, the reason)."""
    tk = HFTokenizer._lib()
    if not isinstance(tok.model, (tk.models.BPE, tk.models.WordPiece, tk.models.WordLevel,
                                  tk.models.Unigram)):
        return None, f"its model is {type(tok.model).__name__}"
    if not all(t.special for t in tok.get_added_tokens_decoder().values()):
        return None, "it has an added token not marked special, which documents may hold"
    norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else None
    pre = json.loads(tok.pre_tokenizer.__getstate__()) if tok.pre_tokenizer else {}
    kind = pre.get("type")
    white_space_starts = _white_space_starts(pre)
    if white_space_starts is not None:
        steps = [] if norm is None else norm.get("normalizers", []) \
            if norm.get("type") == "Sequence" else [norm]
        other = [step.get("type") for step in steps if not isinstance(step, dict) or
                 step.get("type") not in _NORMALIZERS_KEEPING_WHITE_SPACE_CUTS]
        if other:
            return None, f"its normalizer {'+'.join(map(str, other))} may join text across a cut"
        return white_space_starts, None
    if norm is not None and norm != {"type": "NFC"}:
        return None, f"its normalizer {norm.get('type')} may join text across a cut"
    if kind == "ByteLevel" and pre.get("use_regex") is True:
        return (" " if pre.get("add_prefix_space") else " \n"), None
    steps = pre.get("pretokenizers") if kind == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2 and steps[0] == {
            "type": "Split", "pattern": {"Regex": steps[0].get("pattern", {}).get("Regex")},
            "behavior": "Isolated", "invert": False} and \
            steps[0]["pattern"]["Regex"] in _SPLIT_REGEXES_CUT_AT_A_SPACE and \
            steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False:
        # ByteLevel's add_prefix_space puts a space before each word of the Split's, here
        return " ", None
    if kind == "Metaspace":
        return None, "its Metaspace pre-tokenizer does not split: the text is one word"
    if not kind:
        return None, "it has no pre-tokenizer: the text is one word"
    return None, f"its pre-tokenizer {kind} may join text across a cut"


def _tokens_of_whole(tok, document: str, add_special_tokens: bool) -> int:
    """About how many tokens the library tokenizer `tok` gives `document`: those of its first
    ENCODE_PIECE_CHARS characters, scaled to its length (characters a token run from under 1,
    CJK with a byte-level kind, to 4 and more)."""
    head = document[:ENCODE_PIECE_CHARS]
    try:
        n = len(tok.encode(head, add_special_tokens=add_special_tokens).ids)
    except Exception:  # the library's own: the document's encoding meets it and says so
        n = len(head)
    return round(n * len(document) / max(len(head), 1))


def _pieces_of(documents, starts: str | None):
    """(piece, whether it ends its document) for each piece of each document, in order."""
    for doc in documents:
        pieces = document_pieces(doc, starts)
        piece = next(pieces)
        for following in pieces:
            yield piece, False
            piece = following
        yield piece, True


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (the `bpe` extra): a byte-level BPE trained on the
    corpus ("bpe"), or any tokenizer.json the user gives ("file"). Loaded from local files
    only; end-of-text is the tokenizer's own special token (GPT-2's <|endoftext|>)."""

    def __init__(self, tok, name: str, eot_id: int | None):
        # a tokenizer.json may carry the truncation and padding it was saved with (one saved
        # from an encoder's pipeline: max_length 128, say): documents were cut to it, or padded
        # with its pad id inside the data. Documents and prompts are encoded whole.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.name = name
        self.eot_id = eot_id
        # the post-processor's tokens (BERT's [CLS] ... [SEP], Llama's <s>) are no part of a
        # GPT-style document or prompt: end-of-text alone separates documents. Data prepared
        # before meta.json recorded this rule has them (load_tokenizer sets it True there).
        self.add_special_tokens = False
        # ids may have gaps (get_vocab_size() counts tokens): every id needs a row
        ids = np.fromiter(tok.get_vocab().values(), dtype=np.int64)
        self.vocab_size = max(tok.get_vocab_size(), int(ids.max(initial=-1)) + 1)
        has_token = np.zeros(self.vocab_size, dtype=bool)
        has_token[ids] = True
        # the gaps: ids with no token, which the library's decoder drops silently (sampling
        # never draws them; decode refuses them)
        self.unused_ids = np.flatnonzero(~has_token)
        self._unused = frozenset(self.unused_ids.tolist())

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError:
            raise DataError("Hugging Face tokenizers need the `tokenizers` package "
                            "(pip install 'cllm-gpu[bpe]')") from None
        return tokenizers

    @classmethod
    def train(cls, documents: list[str], vocab_size: int):
        if vocab_size < 257:  # below it the trainer silently returns the 257 base symbols
            raise DataError(f"bpe_vocab_size must be >= 257 (the 256 byte symbols and "
                            f"end-of-text), got {vocab_size}", ["bpe_vocab_size"])
        if vocab_size > MAX_BPE_VOCAB:  # the trainer allocates for it first: 2**30 aborted
            raise DataError(f"bpe_vocab_size must be <= {MAX_BPE_VOCAB} (2**24), got "
                            f"{vocab_size}", ["bpe_vocab_size"])
        tok = cls._lib().ByteLevelBPETokenizer()
        # the trainer counts the words of what it is given: documents cut where no word
        # crosses (document_pieces) give it the same counts, so the same merges and
        # tokenizer.json, holding a piece at a time (given whole, some 500 bytes a token)
        pieces = (piece for piece, _ in _pieces_of(documents, piece_starts(tok._tokenizer)))
        tok.train_from_iterator(pieces, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[EOT_TEXT], show_progress=False)
        return cls(tok, "bpe", tok.token_to_id(EOT_TEXT))

    @classmethod
    def load(cls, path: Path, name: str = "file", eot_token: str | None = EOT_TEXT,
             raw: bytes | None = None):
        """Read a tokenizer.json (raw: its bytes, read already: parsed as they are, not
        read again). eot_token: its end-of-text token, which must exist (None: the data has
        none: prepared before end-of-text existed)."""
        tk = cls._lib()
        if raw is None:  # read here, not by the library: it takes a path only as UTF-8 text
            try:
                raw = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            tok = tk.Tokenizer.from_buffer(raw)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot load tokenizer ({first})") from None
        eot_id = None
        if eot_token is not None:
            eot_id = tok.token_to_id(eot_token)
            if eot_id is None:
                raise DataError(f"{path}: the tokenizer has no {eot_token!r} token (name its "
                                f"end-of-text token with --eot-token)")
        return cls(tok, name, eot_id)

    @classmethod
    def from_gpt2_files(cls, vocab_json: Path, eot_token: str = EOT_TEXT):
        """GPT-2's byte-level BPE from its original files, built as transformers builds GPT-2's
        tokenizer.json from them: vocab.json (token -> id), the merges.txt beside it (one merge
        a line, by rank) and, when there, added_tokens.json (tokens added after training,
        token -> id, ordinary added tokens as transformers loads them); GPT-2's pre-tokenizer,
        post-processor and decoder. eot_token must be one of these tokens: it becomes special,
        at its own id."""
        tk = cls._lib()
        vocab = read_token_ids(vocab_json)
        _require_byte_symbols(vocab_json, vocab)
        merges = _read_merges(merges_beside(vocab_json), vocab)
        added_json = vocab_json.with_name("added_tokens.json")
        added = read_token_ids(added_json) if added_json.is_file() else {}
        try:
            model = tk.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                  continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False)
        except Exception as e:  # the library's own: e.g. an id past 2**32
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{vocab_json}: cannot build GPT-2's BPE from it ({first})") from None
        tok = tk.Tokenizer(model)
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
        tok.decoder = tk.decoders.ByteLevel()
        # the library gives each added token the next free id: added in id order, each must
        # land on the id its file gives, or the ids would mean other tokens than the weights'
        for token, i in sorted(added.items(), key=lambda kv: kv[1]):
            if vocab.get(token, i) != i:
                raise DataError(f"{added_json}: {token!r} has id {i} there, {vocab[token]} in "
                                f"vocab.json")
            if token == eot_token:
                tok.add_special_tokens([token])
            else:
                tok.add_tokens([token])
            if tok.token_to_id(token) != i:
                raise DataError(f"{added_json}: {token!r} has id {i}; added tokens must take "
                                f"the ids after vocab.json's, in order ({tok.token_to_id(token)} "
                                f"is next)")
        if eot_token in vocab:
            tok.add_special_tokens([eot_token])
        elif eot_token not in added:
            raise DataError(f"{vocab_json}: the tokenizer has no {eot_token!r} token (name its "
                            f"end-of-text token with --eot-token)")
        return cls(tok, "file", tok.token_to_id(eot_token))

    def to_json(self) -> str:
        """The tokenizer.json text (what `tokenizers` saves)."""
        return self._tok.to_str(pretty=True)

    def encode(self, text: str) -> np.ndarray:
        short = repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
        return self.encode_batch([text], what=short)[0]

    def encode_batch(self, texts: list[str], what: str = "the corpus",
                     tok=None) -> list[np.ndarray]:
        """tok: the library tokenizer to encode with (default this one's)."""
        try:
            encodings = (tok or self._tok).encode_batch(
                texts, add_special_tokens=self.add_special_tokens)
        except Exception as e:  # the library's own: e.g. a word-level model without [UNK]
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"the {self.name} tokenizer cannot encode {what} ({first})") from None
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def encode_documents(self, docs: list[str], done=None, log=None) -> list[np.ndarray]:
        """Documents are text: a special token's text in one ('<|endoftext|>' in a page about
        GPT-2) is encoded as text, not as the token (as nanoGPT's encode_ordinary), so
        end-of-text only ever ends a document. Prompts (encode) still reach the token.
        Encoded a batch of about ENCODE_BATCH_CHARS characters at a time, each document's ids
        kept as token_dtype: the library's encodings hold some 120 bytes a token (their
        strings, offsets and masks), and all of a corpus's held at once needed 30 GB for a
        1 GB corpus. A document longer than ENCODE_PIECE_CHARS is encoded a piece at a time
        where the tokenizer gives each piece the ids it gives there in the whole
        (piece_starts); given whole, the library held some 500 bytes a token of it: `log`
        (a function taking a line) gets a note saying so first, for a tokenizer that cannot
        be cut (a long document's encoding said nothing until it ended, or ran out of
        memory). done: called with the characters encoded so far after each batch."""
        inner = self._documents_tokenizer()
        starts, why = _piece_rule(inner)
        longest = max(docs, key=len, default="")
        if starts is None and log is not None and len(longest) > ENCODE_PIECE_CHARS:
            n = sum(len(d) > ENCODE_PIECE_CHARS for d in docs)
            need = format_bytes(WHOLE_DOCUMENT_BYTES_PER_TOKEN
                                * _tokens_of_whole(inner, longest, self.add_special_tokens))
            log(f"note: {n:,} document{'' if n == 1 else 's'} longer than "
                f"{ENCODE_PIECE_CHARS:,} characters encoded whole, with no cut that keeps "
                f"this tokenizer's ids ({why}): the tokenizers library holds some "
                f"{WHOLE_DOCUMENT_BYTES_PER_TOKEN} bytes a token, about {need} for the "
                f"longest ({len(longest):,} characters); to need less, split the text into "
                f"several files or lines of a .jsonl")
        before, inner.encode_special_tokens = inner.encode_special_tokens, True
        dtype, ids, parts, batch, chars = token_dtype(self.vocab_size), [], [], [], 0
        encoded = 0  # the characters of the batches encoded

        def encode(batch):  # parts: the ids of the pieces of a document not yet ended
            nonlocal encoded
            texts = [text for text, _ in batch]
            for (_, ends), piece_ids in zip(batch, self.encode_batch(texts, tok=inner)):
                parts.append(piece_ids.astype(dtype))
                if ends:
                    ids.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
                    parts.clear()
            encoded += sum(map(len, texts))
            if done is not None:
                done(encoded)
        try:
            for piece in _pieces_of(docs, starts):
                batch.append(piece)
                chars += len(piece[0])
                if chars >= ENCODE_BATCH_CHARS:
                    encode(batch)
                    batch, chars = [], 0
            if batch:
                encode(batch)
            return ids
        finally:
            inner.encode_special_tokens = before

    def _documents_tokenizer(self):
        """The library tokenizer documents are encoded with: this one, or where its
        end-of-text token is an added token not marked special (a tokenizer.json's, named by
        --eot-token), a copy in which it is special: encode_special_tokens passes over
        ordinary added tokens, so its text inside a document was encoded as end-of-text."""
        inner = getattr(self._tok, "_tokenizer", self._tok)  # ByteLevelBPETokenizer wraps one
        added = inner.get_added_tokens_decoder()
        if self.eot_id not in added or added[self.eot_id].special:
            return inner
        tk = self._lib()
        copy = tk.Tokenizer.from_str(inner.to_str())
        copy.add_special_tokens([tk.AddedToken(added[self.eot_id].content, special=True)])
        return copy

    def post_processor_tokens(self) -> list[str]:
        """The tokens the tokenizer's post-processor adds to each text it encodes with the
        library's default (add_special_tokens=True, as transformers calls it): BERT's [CLS] and
        [SEP], Llama's <s>; none for GPT-2's."""
        inner = getattr(self._tok, "_tokenizer", self._tok)  # ByteLevelBPETokenizer wraps one
        return inner.encode("", add_special_tokens=True).tokens

    def decode(self, ids) -> str:
        """Special tokens included: end-of-text shows as the token's text. An id past the
        vocabulary, or in a gap of it, is refused: the library's decoder drops it silently."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DataError(_not_in_vocabulary(self.name, i, self.vocab_size))
            if i in self._unused:
                raise DataError(f"token id {i} has no token in the {self.name} tokenizer (a gap "
                                f"in its ids): another tokenizer's ids")
        return self._tok.decode(ids, skip_special_tokens=False)


def _not_in_vocabulary(name: str, i: int, vocab_size: int) -> str:
    return (f"token id {i} is not in the {name} tokenizer's vocabulary (ids 0..{vocab_size - 1}): "
            f"a model with a larger vocabulary, or another tokenizer's ids")


def read_token_ids(path: Path, error=DataError) -> dict:
    """{token: id} of a JSON file of them (GPT-2's vocab.json, added_tokens.json); anything
    else raises `error` in one line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    ids = parse_json(raw, path, error)
    if not isinstance(ids, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids.values()):
        raise error(f"{path}: expected a JSON object of token -> id")
    by_id = {}
    for token, i in ids.items():
        if i in by_id:
            raise error(f"{path}: {by_id[i]!r} and {token!r} have the same id {i}")
        by_id[i] = token
    return ids


def _require_byte_symbols(vocab_json: Path, vocab: dict):
    """A byte-level BPE without a symbol for some byte drops that byte from the text silently
    (GPT-2's BPE has no unknown token): every one of the 256 must be in the vocabulary."""
    missing = [c for c in _gpt2_byte_chars() if c not in vocab]
    if missing:
        raise DataError(f"{vocab_json}: not GPT-2's byte-level vocabulary: {len(missing)} of "
                        f"the 256 byte symbols are missing (the first: {missing[0]!r})")


def merges_beside(vocab_json: Path) -> Path:
    """The merges file that goes with a vocab file: merges.txt beside vocab.json, and with the
    same prefix for prefixed names (Megatron-LM's gpt2-vocab.json and gpt2-merges.txt)."""
    return vocab_json.with_name(vocab_json.name[:-len("vocab.json")] + "merges.txt")


def _read_merges(path: Path, vocab: dict) -> list[tuple[str, str]]:
    """GPT-2's merges.txt: a '#version' first line (optional), then one merge a line, by rank:
    two tokens separated by a space, both of them and their join in the vocabulary."""
    if not path.is_file():
        raise DataError(f"{path}: missing (GPT-2's vocab file needs its merges file beside "
                        f"it: vocab.json and merges.txt, or PREFIX-vocab.json and "
                        f"PREFIX-merges.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline
        lines.pop()
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if n == 1 and line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or "" in pair:
            raise DataError(f"{path}:{n}: expected two tokens separated by a space, got "
                            f"{line[:40]!r}")
        for token in (*pair, "".join(pair)):
            if token not in vocab:
                raise DataError(f"{path}:{n}: {token!r} is not in vocab.json")
        merges.append(tuple(pair))
    return merges


def read_tokenizer_file(data_dir: Path, meta: dict) -> tuple[Path, bytes]:
    """The tokenizer.json of a token directory: (its path, its bytes), read once and checked
    against meta.json's SHA-256. The bytes checked are the bytes used: checked by name and
    read again, a file renamed over in between (another prepare) was used unchecked."""
    path = Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file missing")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if meta.get("tokenizer_sha256") and \
            hashlib.sha256(raw).hexdigest() != meta["tokenizer_sha256"]:
        raise DataError(f"{path}: tokenizer does not match meta.json (SHA-256 differs)")
    return path, raw


def load_tokenizer(data_dir: Path, meta: dict, tokenizer_json: bytes | None = None):
    """The tokenizer a token directory was prepared with (its meta.json), end-of-text id set.
    tokenizer_json: its tokenizer.json's bytes, read already (read_tokenizer_file)."""
    if meta["tokenizer"] == "byte":
        return ByteTokenizer(meta.get("eot_id"))
    if meta["tokenizer"] in ("bpe", "file"):
        path = Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
        if tokenizer_json is None:
            path, tokenizer_json = read_tokenizer_file(data_dir, meta)
        tok = HFTokenizer.load(path, meta["tokenizer"], eot_token=None, raw=tokenizer_json)
        tok.eot_id = meta.get("eot_id")
        # absent: prepared with the library's default, the post-processor's tokens in every
        # document; prompts are encoded as those documents were
        tok.add_special_tokens = meta.get("add_special_tokens", True)
        if tok.vocab_size != meta["vocab_size"]:
            raise DataError(f"{path}: tokenizer vocab {tok.vocab_size} does not match "
                            f"meta.json vocab_size {meta['vocab_size']}")
        return tok
    raise DataError(f"meta.json: unknown tokenizer {meta['tokenizer']!r}")


def tokenizer_identity(meta: dict) -> dict:
    """What tells a token directory's tokenizer from another (a checkpoint records it, so that
    sample, eval and export refuse data whose ids mean other tokens): its kind, vocabulary
    size, end-of-text id and, for a tokenizer.json, the file's SHA-256 and whether the
    documents carry its post-processor's tokens (add_special_tokens: meta.json's, absent
    there before 2026-12-02, when they did)."""
    identity = {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
                "eot_id": meta.get("eot_id")}
    if meta.get("tokenizer_sha256"):
        identity["tokenizer_sha256"] = meta["tokenizer_sha256"]
    if meta["tokenizer"] != "byte":
        identity["add_special_tokens"] = meta.get("add_special_tokens", True)
    return identity


def same_tokenizer(a: dict, b: dict) -> bool:
    """Two tokenizer identities name the same tokenizer: the same tokenizer.json (its SHA-256:
    a file given to prepare is the same whether it was trained there or not), else the same
    kind; both with the same vocabulary size and end-of-text id."""
    if a.get("tokenizer_sha256") and b.get("tokenizer_sha256"):
        keys = ("tokenizer_sha256", "vocab_size", "eot_id")
    else:
        keys = ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_tokenizer(identity: dict) -> str:
    """'bpe, vocab 300, end-of-text 256, SHA-256 1f2e3d4c5b6a...' (one line: the SHA's first
    12 digits)."""
    eot = identity.get("eot_id")
    sha = identity.get("tokenizer_sha256")
    return (f"{identity['tokenizer']}, vocab {identity['vocab_size']:,}, "
            + (f"end-of-text {eot}" if eot is not None else "no end-of-text")
            + (f", SHA-256 {sha[:12]}..." if sha else ""))


def check_run_tokenizer(recorded: dict | None, data_dir, meta: dict, ck_dir) -> str | None:
    """The data's tokenizer must be the one a run was trained with (`recorded`, from its
    state.json): another one's ids decode as other text (HF decoders drop unknown ids, the byte
    tokenizer prints them as other bytes) and its loss is not this model's. Returns a note
    when the checkpoint records no tokenizer (written before 2026-12-02): nothing to check."""
    if recorded is None:
        return (f"{ck_dir}: the checkpoint records no tokenizer (written before they were "
                f"recorded): {data_dir}'s tokenizer is taken as the run's unchecked")
    if not same_tokenizer(recorded, tokenizer_identity(meta)):
        raise DataError(f"{data_dir} was prepared with another tokenizer "
                        f"({describe_tokenizer(tokenizer_identity(meta))}) than the run "
                        f"{ck_dir} was trained with ({describe_tokenizer(recorded)}): its ids "
                        f"mean other tokens; give --data a token directory prepared with the "
                        f"run's tokenizer")
    _check_post_processor_rule(recorded, data_dir, meta, ck_dir)
    return None


# what a checkpoint records of its data's meta.json (data_fingerprint): the data position it
# records, an RNG state, means the same windows only over the same train.bin
FINGERPRINT_FIELDS = ("train_tokens", "val_tokens", "unigram_entropy_nats")


def data_fingerprint(meta: dict) -> dict:
    """What tells a token directory's tokens from those of another prepare (another corpus,
    another --val-fraction) with the same tokenizer: meta.json's token counts and unigram
    entropy (those of its fields it has: data written by another tool may lack them)."""
    return {k: meta[k] for k in FINGERPRINT_FIELDS if meta.get(k) is not None}


def data_change_note(recorded, data_dir, meta: dict, ck_dir) -> str | None:
    """A note when the data a run resumes on is not the data its checkpoint was trained on
    (`recorded`: its data_fingerprint; None: written before it was recorded, not checked):
    the run goes on from the checkpoint's RNG state, which draws other windows from other
    tokens, so it does not continue as an uninterrupted run would. Not refused: going on over
    a corpus prepared again with more text is a run's to choose."""
    if not isinstance(recorded, dict):
        return None
    now = data_fingerprint(meta)
    if all(recorded.get(k) == now.get(k) for k in FINGERPRINT_FIELDS
           if k in recorded and k in now):
        return None
    changed = [f"{split}.bin {recorded[k]:,} -> {now[k]:,} tokens"
               for split, k in (("train", "train_tokens"), ("val", "val_tokens"))
               if k in recorded and k in now and recorded[k] != now[k]]
    what = ", ".join(changed) or (f"the same token counts, unigram entropy "
                                  f"{recorded['unigram_entropy_nats']:.6f} -> "
                                  f"{now['unigram_entropy_nats']:.6f} nats")
    return (f"{data_dir} holds other tokens than {ck_dir} was trained on ({what}: prepared "
            f"again, or other data): the run goes on from the checkpoint's data position, an "
            f"RNG state, over them, not with the batches it would have drawn")


def _check_post_processor_rule(recorded: dict, data_dir, meta: dict, ck_dir):
    """The same tokenizer.json, its post-processor's tokens (BERT's [CLS] ... [SEP]) in every
    document of the run's data and in none of this data's, or the other way round (prepared
    before and since 2026-12-02): the ids mean the same tokens, but the model would train on,
    be scored on and be prompted with documents framed as it never saw them. A checkpoint
    written before the rule was recorded is not checked; nor is a tokenizer whose
    post-processor adds nothing (GPT-2's, prepare's own BPE), which both rules encode alike."""
    run_has = recorded.get("add_special_tokens")
    data_has = tokenizer_identity(meta).get("add_special_tokens")
    if run_has is None or data_has is None or run_has == data_has:
        return
    added = ", ".join(load_tokenizer(Path(data_dir), meta).post_processor_tokens())
    if not added:
        return
    if run_has:
        raise DataError(f"{data_dir}'s documents leave out the tokenizer post-processor's "
                        f"tokens ({added}) that every document the run {ck_dir} was trained on "
                        f"carried (prepared before 2026-12-02): the model never saw documents "
                        f"or prompts without them; give --data the run's own token directory")
    raise DataError(f"{data_dir} was prepared before 2026-12-02: every document carries the "
                    f"tokenizer post-processor's tokens ({added}), which the run {ck_dir} was "
                    f"trained without; prepare its source again (`cllm-gpu prepare`)")


# ------------------------------------------------------------------ corpora
def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The embedded default corpus: the Python standard library's own top-level .py modules in
    sorted order, whole, until their size reaches `max_bytes` (the last may pass it: 200,000
    takes about 330 kB). Present on every machine with Python; no download."""
    if max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}", ["max_bytes"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        if total >= max_bytes:
            break
        try:
            size = p.stat().st_size
        except OSError:
            continue
        files.append(p)
        total += size
    if not files:
        raise DataError(f"no Python sources found under {stdlib} for the default corpus")
    return files


def _folder_files(top: Path, skipped: list | None = None):
    """(path, its real path) of every file under `top`, hidden names (starting with '.':
    .git's objects are no corpus), lost+found folders and folders cllm-gpu wrote
    (_written_by_cllm_gpu; each appended to `skipped`) left out at any depth.
    Links to folders are followed (a corpus may link in a dataset kept elsewhere), each real
    folder once, in sorted order: a link back up the tree, or to a folder read already, adds
    nothing and cannot loop. A folder that cannot be read is refused (DataError), as a file
    is. A file's real path is its folder's (resolved once) joined with its name, or, for a
    link, the link resolved: resolving each file's whole path took 4.1 s of 9.3 for 100,000
    files."""
    def refuse(e: OSError):  # os.walk's default drops a folder it cannot list, silently
        raise DataError(f"{e.filename}: cannot read the folder ({e.strerror or e})")
    seen = set()
    for root, dirs, names in os.walk(top, onerror=refuse, followlinks=True):
        dirs.sort()  # the walk's order decides which of two links to one folder is read
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if root != str(top) and _written_by_cllm_gpu(Path(root), names):
            if skipped is not None:
                skipped.append(Path(root))
            dirs.clear()
            continue
        # lost+found: a file system's (a corpus at a mount point), root's alone to read, and
        # what fsck recovered is no corpus: refused as unreadable, it ended a user's prepare
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "lost+found"]
        for n in names:
            if not n.startswith("."):
                path = os.path.join(root, n)
                yield Path(path), (os.path.realpath(path) if os.path.islink(path)
                                   else os.path.join(real, n))


def _written_by_cllm_gpu(folder: Path, names) -> bool:
    """Whether a folder inside a corpus is cllm-gpu's own output, not text: prepared token
    data (meta.json beside train.bin), a checkpoint (state.json beside model.safetensors) or a
    training run (metrics.jsonl whose first record is a run's start)."""
    names = set(names)
    if {"meta.json", "train.bin"} <= names or {"state.json", "model.safetensors"} <= names:
        return True
    if "metrics.jsonl" not in names:
        return False
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            first = json.loads(f.readline() or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("type") == "start" and "step" in first


def collect_text_files(source: Path, out_dir: Path | None = None,
                       skipped: list | None = None) -> list[Path]:
    """The files of a corpus: the file itself, or a folder's files in sorted order (links to
    folders followed, each folder once), hidden files and folders and lost+found left out,
    and out_dir's
    (prepare's own output, when it lies inside), and folders of cllm-gpu's other outputs
    (prepared data, runs, checkpoints: appended to `skipped`)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        out = os.path.realpath(out_dir) if out_dir is not None else None

        def inside_out(real: str) -> bool:  # `real`: a real path, as `out`
            return out is not None and (real == out or real.startswith(os.path.join(out, "")))
        found = []  # out_dir's earlier output is left out as out_dir, without a word
        files = sorted(p for p, real in _folder_files(source, found) if p.is_file()
                       and not inside_out(real))
        if skipped is not None:
            skipped.extend(p for p in found if not inside_out(os.path.realpath(p)))
        if not files:
            raise DataError(f"{source}: no files to read")
        return files
    if source.exists():  # not opened: a FIFO would block
        raise DataError(f"{source}: not a regular file or a directory (a FIFO, device or "
                        f"socket): nothing to read")
    raise DataError(f"{source}: no such file or directory")


def _read_text(path: Path, notes: list | None = None) -> str:
    """The file's text, without a UTF-8 byte-order mark at its start (the file's encoding
    signature, not text: a .jsonl file's first line would not be JSON); bytes that are not
    UTF-8 read as U+FFFD, and said in `notes` (a Latin-1 corpus, or a binary file in a corpus
    folder, would otherwise train silently on replacement characters)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        if notes is not None:
            bad = _bytes_replaced(raw, text)
            notes.append(f"{path}: {bad:,} byte{'' if bad == 1 else 's'} not UTF-8 (the first "
                         f"at offset {e.start:,}), read as U+FFFD")
    return text.removeprefix("\ufeff")


def _bytes_replaced(raw: bytes, text: str) -> int:
    """How many bytes of `raw` its decoding `text` (errors="replace") replaced: each U+FFFD the
    decoding put in (those of the text itself: its valid EF BF BD, which no invalid sequence
    can swallow, EF being no continuation byte) stands for 3 bytes of text.encode() and for
    one invalid run of raw's bytes. Counted from lengths: the surrogate-escaped text's
    surrogates, a list of one string a byte, took 45 bytes of memory a byte of a binary
    file (895 MB for 20 MB)."""
    put_in = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    return len(raw) - (len(text.encode("utf-8")) - 3 * put_in)


def iter_jsonl(path, lines):
    """(line number, value) for each non-blank line of a JSON-lines file; a line that is not
    JSON raises DataError naming the file and the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        yield n, parse_json(line, f"{path}:{n}", DataError)


def read_documents(path: Path, notes: list | None = None) -> list[str]:
    """The documents of one file: a `.jsonl` file holds one per line (its "text" field; blank
    lines are skipped), any other file is one document. A bad line raises DataError naming
    the file and line number; bytes that are not UTF-8 are noted in `notes`."""
    if path.suffix.lower() != ".jsonl":
        return [_read_text(path, notes)]
    # read a line at a time: the whole file's bytes, its text and the list of its lines, all
    # held at once beside the documents, were a peak of 4.1 bytes a byte of a 20 MB .jsonl
    # (tracemalloc), 1.7 read this way (the documents: 2 bytes a character, a dash in them).
    docs, bad, first_bad, offset = [], 0, None, 0
    try:
        with open(path, "rb") as f:
            # records end at \n only, as binary lines do: splitlines() would also split at
            # U+2028, U+0085, ... that JSON strings may hold raw
            for n, raw in enumerate(f, 1):
                offset, start = offset + len(raw), offset
                raw = raw.removesuffix(b"\n")  # a bad line's error says where, as in the line
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:  # no invalid sequence spans a \n (ASCII)
                    line = raw.decode("utf-8", errors="replace")
                    bad += _bytes_replaced(raw, line)
                    first_bad = start + e.start if first_bad is None else first_bad
                if n == 1:  # the file's encoding signature, not text (_read_text)
                    line = line.removeprefix("\ufeff")
                if line.strip():
                    docs.append(_document_text(parse_json(line, f"{path}:{n}", DataError),
                                               path, n))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if bad and notes is not None:
        notes.append(f"{path}: {bad:,} byte{'' if bad == 1 else 's'} not UTF-8 (the first "
                     f"at offset {first_bad:,}), read as U+FFFD")
    return docs


def _document_text(rec, path: Path, n: int) -> str:
    """The "text" of line n's record, checked."""
    if not isinstance(rec, dict) or "text" not in rec:
        raise DataError(f"{path}:{n}: expected a JSON object with a \"text\" field")
    if not isinstance(rec["text"], str):
        raise DataError(f"{path}:{n}: \"text\" must be a string, got "
                        f"{type(rec['text']).__name__}")
    try:  # a "\ud800" escape is valid JSON but no text: the tokenizers cannot encode it
        rec["text"].encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}:{n}: \"text\" is not Unicode text: a lone surrogate "
                        f"{rec['text'][e.start]!r} at character {e.start}") from None
    return rec["text"]


def user_tokenizer(spec: str, eot_token: str | None = None):
    """(tokenizer, its tokenizer.json bytes, the file it came from) for --tokenizer PATH: a
    Hugging Face tokenizer.json, copied as it is, or GPT-2's original files (vocab.json, or a
    directory holding vocab.json and merges.txt), from which the byte-level BPE's tokenizer.json
    is built. A directory with a tokenizer.json gives that file (what transformers loads
    first); a token directory prepare wrote gives the tokenizer its meta.json names."""
    path = Path(spec)
    if path.is_dir() and (path / "meta.json").is_file() and (path / "train.bin").is_file():
        # its tokenizer.json may be an earlier prepare's, there since a byte prepare (which
        # writes none) replaced the data: taken as the directory's, it was another tokenizer
        meta = read_meta(path)
        if meta["tokenizer"] == "byte":
            raise DataError(f"--tokenizer {spec}: a token directory prepared with the byte "
                            f"tokenizer (a tokenizer.json there is an earlier prepare's): give "
                            f"--tokenizer byte")
        path, raw = read_tokenizer_file(path, meta)
        if eot_token is None:  # the data's own: meta.json records what --eot-token named
            eot_token = meta.get("eot_token", EOT_TEXT)
        return HFTokenizer.load(path, "file", eot_token, raw=raw), raw, path
    if eot_token is None:
        eot_token = EOT_TEXT
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "vocab.json")
                 if (path / name).is_file()]
        if not found:
            raise DataError(f"--tokenizer {spec}: the directory holds neither a tokenizer.json "
                            f"nor GPT-2's vocab.json and merges.txt")
        path = found[0]
    elif not path.is_file():
        what = "not a regular file (a FIFO, device or socket)" if path.exists() else "no such file"
        raise DataError(f"--tokenizer {spec}: {what} (give 'byte', 'bpe', the path of a "
                        f"Hugging Face tokenizer.json, or GPT-2's vocab.json or its directory)")
    if path.name.endswith("vocab.json"):   # GPT-2's, or Megatron's gpt2-vocab.json
        tok = HFTokenizer.from_gpt2_files(path, eot_token)
        return tok, tok.to_json().encode("utf-8"), path
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    # the bytes read, not the file again: the tokenizers library takes a path only as UTF-8
    # text (a directory named with b'\xff' was refused), and a file replaced between two
    # reads encoded the data with another tokenizer than the one copied beside it
    return HFTokenizer.load(path, "file", eot_token, raw=raw), raw, path


def prepare(source, out_dir, tokenizer: str = "byte", val_fraction: float = 0.1,
            bpe_vocab_size: int = 4096, max_bytes: int = DEFAULT_CORPUS_BYTES,
            eot_token: str | None = None, notes: list | None = None, log=None,
            progress=None) -> dict:
    """Tokenize `source` into out_dir: "default" (the embedded corpus), a text file (one
    document), a `.jsonl` file (one document per line, its "text" field) or a folder (each file
    as above, in sorted order; hidden files and folders skipped). An end-of-text token follows
    every document; meta.json records its id (`eot_id`). tokenizer: "byte" (ids 0..255,
    end-of-text 256), "bpe" (a byte-level BPE trained on the corpus, end-of-text
    <|endoftext|>) or a user's tokenizer (user_tokenizer: a Hugging Face tokenizer.json, or
    GPT-2's vocab.json + merges.txt), saved beside the data as tokenizer.json, its SHA-256
    recorded; end-of-text: eot_token (default <|endoftext|>, or for a token directory the one
    its meta.json records).
    Everything is read and checked before anything is written. notes: a list that gets one
    line per file holding bytes that are not UTF-8 (read as U+FFFD). log: a function given
    a line to print at once (a note before a long document is encoded whole). progress:
    called with a line saying what prepare is doing, every PROGRESS_SECONDS while it runs
    (_Progress)."""
    with _Progress(progress) as status:
        return _prepare(source, out_dir, tokenizer, val_fraction, bpe_vocab_size, max_bytes,
                        eot_token, notes, log, status)


class _Progress:
    """What a prepare is doing now (`what`, set by the work as it goes: a line, or a function
    making it from counts the work keeps, when the line is said), said every
    PROGRESS_SECONDS by a thread of its own (`say`: a function of one line; None: nothing
    said) until the prepare ends: a BPE's training is one call into the tokenizers library,
    silent until it returns."""

    def __init__(self, say):
        self.what = "starting"
        self._say, self._start = say, time.monotonic()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prepare-progress", daemon=True)

    def _run(self):
        while not self._ended.wait(PROGRESS_SECONDS):
            what = self.what() if callable(self.what) else self.what
            try:
                self._say(f"prepare: {what}, {time.monotonic() - self._start:,.0f} s elapsed")
            except (OSError, ValueError):
                # stdout failing (a full disk, a terminal hung up; closed): the lines end, the
                # work goes on, and its own last line meets the error (a traceback of this
                # thread's said nothing more)
                return

    def __enter__(self):
        if self._say is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._ended.set()
        if self._thread.is_alive():  # no line after prepare's own end (its error, or "wrote")
            self._thread.join()


def _how_far(done: int, total: int, unit: str) -> str:
    """'1,234 of 5,678 files (21%)'."""
    return f"{done:,} of {total:,} {unit} ({100 * done // max(total, 1)}%)"


def _prepare(source, out_dir, tokenizer, val_fraction, bpe_vocab_size, max_bytes, eot_token,
             notes, log, status: _Progress) -> dict:
    """prepare's work, saying what it does in `status`."""
    if not 0.0 < val_fraction < 1.0:
        # no val.bin at all would be a data directory every reader of it refuses (eval, the
        # validation passes, an empty file taken for a damaged one): one token does instead
        why = ("; every data directory holds a validation split (val.bin), at least one "
               "token: to hold back next to nothing give --val-fraction 1e-9 (one token in "
               "a corpus under 2 billion) and train with --eval-interval 0, which never reads "
               "val.bin"
               if val_fraction == 0 else "")
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}{why}",
                        ["val_fraction"])
    status.what = "listing the corpus's files"
    if source in (None, "default"):
        files, source_desc = default_corpus_files(max_bytes), "python-stdlib"
    else:
        skipped = []
        files, source_desc = collect_text_files(Path(source), out_dir, skipped), str(source)
        if skipped and notes is not None:
            notes.append(f"skipped {len(skipped):,} folder{'' if len(skipped) == 1 else 's'} "
                         f"cllm-gpu wrote (prepared data, runs, checkpoints): "
                         f"{', '.join(str(p) for p in skipped)}")
    docs, read = [], 0
    status.what = lambda: f"reading {_how_far(read, len(files), 'files')}"
    for f in files:
        docs += read_documents(f, notes)
        read += 1
    if not any(docs):
        raise DataError(f"{source_desc}: the corpus is empty")
    meta = {"version": META_VERSION, "tokenizer": tokenizer, "source": source_desc,
            "files": len(files), "documents": len(docs)}
    tok_json = None  # a user's tokenizer: its tokenizer.json bytes
    chars, tokenized = sum(map(len, docs)), 0
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        status.what = (f"training the BPE tokenizer ({bpe_vocab_size:,} tokens) on "
                       f"{chars:,} characters")
        tok = HFTokenizer.train(docs, bpe_vocab_size)
    else:
        tok, tok_json, tok_source = user_tokenizer(tokenizer, eot_token)
        eot_token = tok._tok.id_to_token(tok.eot_id)  # the one user_tokenizer resolved
        meta.update(tokenizer="file", tokenizer_source=str(tok_source))

    def count_tokenized(n: int):  # once a document (byte): the line is made when said
        nonlocal tokenized
        tokenized = n
    status.what = lambda: f"tokenizing {_how_far(tokenized, chars, 'characters')}"
    encoded = tok.encode_documents(docs, done=count_tokenized, log=log)
    del docs  # the text: the ids are all that is held from here on
    dtype = token_dtype(tok.vocab_size)
    n_tokens = sum(len(d) + 1 for d in encoded)  # an end-of-text after each document
    out = Path(out_dir)
    refuse_a_file_for_a_directory(out, "--out", error=DataError)
    n_val = max(1, int(n_tokens * val_fraction))
    n_train = n_tokens - n_val
    blocks = _token_blocks(encoded, tok.eot_id, dtype)  # `encoded` let go of meanwhile
    # a tokenizer whose model vocabulary (not only its added tokens) holds the end-of-text
    # token encodes its text as it, whatever is special: one after each document, the rest
    # inside them
    inside = sum(int(np.count_nonzero(b == tok.eot_id)) for b in blocks) - meta["documents"]
    if inside and notes is not None:  # first: the CLI shows 5 notes, counts the rest as UTF-8's
        notes.insert(0, f"the end-of-text token {eot_token!r} stands {inside:,} "
                        f"time{'' if inside == 1 else 's'} inside documents: the tokenizer "
                        f"encodes its text there as the token (a token of its model's "
                        f"vocabulary, not only an added one); name another with --eot-token to "
                        f"keep end-of-text between documents")
    train = functools.partial(_token_slices, blocks, 0, n_train)
    val = functools.partial(_token_slices, blocks, n_train, n_tokens)
    status.what = f"counting and writing {n_tokens:,} tokens"
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for chunk in train():  # no minlength: a 2**24 vocabulary's 128 MB zeroed for each chunk
        in_chunk = np.bincount(chunk)
        counts[:len(in_chunk)] += in_chunk
    p = counts[counts > 0] / counts.sum()
    meta.update({"vocab_size": int(tok.vocab_size), "eot_id": int(tok.eot_id),
                 # eot_token names a tokenizer.json's own; byte and bpe have GPT-2's
                 "eot_token": eot_token if tok_json is not None else EOT_TEXT,
                 "dtype": np.dtype(dtype).name,
                 "train_tokens": n_train, "val_tokens": n_val,
                 # + 0.0: one kind of token is -(1 x log 1) = -0.0, printed "-0.000"
                 "unigram_entropy_nats": float(-(p * np.log(p)).sum()) + 0.0})
    # in the order they are renamed into place: meta.json, which describes the others, last
    outputs = {}
    if tokenizer != "byte":
        meta["add_special_tokens"] = tok.add_special_tokens
        outputs["tokenizer.json"] = (tok_json if tok_json is not None
                                     else tok.to_json().encode("utf-8"))
        meta["tokenizer_file"] = "tokenizer.json"
        meta["tokenizer_sha256"] = hashlib.sha256(outputs["tokenizer.json"]).hexdigest()
    outputs["train.bin"] = lambda path: _write_chunks(train(), path)
    outputs["val.bin"] = lambda path: _write_chunks(val(), path)
    outputs["meta.json"] = json_bytes(meta)
    # a prepare that failed (a full disk, a Ctrl-C) leaves no empty directory behind
    with directory_made_for(out, "output directory", DataError):
        if not os.access(out, os.W_OK):
            raise DataError(f"{out}: output directory is not writable")
        write_files(out, outputs, may_write=PREPARE_FILES,
                    superseded=lambda: _earlier_prepares_tokenizer(out, outputs))
    return meta


def _earlier_prepares_tokenizer(out: Path, outputs: dict) -> list:
    """["tokenizer.json"] where the data being renamed in writes none (a byte prepare) and the
    one there is the tokenizer of the data it replaces (meta.json names it, its SHA-256 is
    meta.json's): left beside byte data it read as the data's tokenizer to anything that
    takes the file by name (`--tokenizer DIR/tokenizer.json`, transformers). A tokenizer.json
    meta.json does not vouch for (the user's own), or names as the tokenizer's source (one a
    prepare was given in its own --out), is not prepare's to remove."""
    if "tokenizer.json" in outputs:
        return []
    try:
        old = json.loads((out / "meta.json").read_bytes())
        raw = (out / "tokenizer.json").read_bytes()
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(old, dict) or old.get("tokenizer_file", "tokenizer.json") != \
            "tokenizer.json" or old.get("tokenizer") not in ("bpe", "file"):
        return []
    # `prepare --tokenizer D/tokenizer.json --out D`: the file was that prepare's source (the
    # user's own, its only copy), which it rewrote in place, not a file it made. A user's
    # tokenizer ("file") is removed only where its source is found to be another file (the
    # source is recorded as typed: relative to where that prepare ran, maybe not here)
    source = old.get("tokenizer_source")
    if old.get("tokenizer") == "file" and not (
            isinstance(source, str) and os.path.exists(source)
            and not _same_file(source, out / "tokenizer.json")):
        return []
    return ["tokenizer.json"] if old.get("tokenizer_sha256") == \
        hashlib.sha256(raw).hexdigest() else []


def _same_file(a, b) -> bool:
    """Whether paths a and b name one existing file (False where either cannot be read)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def missing_dirs(path: Path) -> list[Path]:
    """The directories mkdir(parents=True) would make for path, deepest first. Walked a
    component at a time, as the kernel does: a `..` after a directory still to be made is the
    path before that directory (it will be a real one, no link), so `new/../keep` makes new
    alone where keep exists (asked whole, nothing under the missing new exists: keep was
    taken for one to make, and removed by remove_empty_dirs though it was the user's); a `..`
    after one that exists is left to the kernel (a link's is its target's parent)."""
    path = Path(path)
    cur, made = Path(path.anchor), []
    for part in path.parts[1 if path.anchor else 0:]:
        if part == "..":
            cur = cur.parent if cur in made else cur / part
            continue
        cur = cur / part
        if cur not in made and not cur.exists():
            made.append(cur)
    return made[::-1]


def remove_empty_dirs(made: list[Path]):
    """Remove missing_dirs' directories again, deepest first, as far as they are empty (a
    failure here must not replace the error that undoes them)."""
    for d in made:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            break


@contextlib.contextmanager
def directory_made_for(out: Path, what: str, error=DataError):
    """out made (with its parents) for the files written in the block, and where the block
    fails (a full disk, a Ctrl-C) the directories it made removed again, as far as they are
    empty (`--out a/b` made both a and b): a failed prepare or export leaves none behind.
    `what`: out's name in the refusal of a directory that cannot be made."""
    made = missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{out}: cannot create {what} ({e.strerror})") from None
    try:
        yield
    except BaseException:
        remove_empty_dirs(made)
        raise


# every file a prepare may write (tokenizer.json: not the byte tokenizer's): whichever it
# writes, a killed prepare's temporaries of any of them are removed
PREPARE_FILES = ("tokenizer.json", "train.bin", "val.bin", "meta.json")


def _token_blocks(encoded: list, eot_id: int, dtype) -> list:
    """The token stream (each document's ids, then end-of-text) as little-endian `dtype`
    arrays of WRITE_CHUNK_TOKENS tokens or more (the last fewer, a longer document's more),
    each document's ids let go of as they are copied (`encoded` is emptied): the stream is
    never held twice over, nor made one array (its copies, and an int64 one to count it,
    took 12 bytes a byte of text)."""
    little = np.dtype(dtype).newbyteorder("<")
    eot = np.array([eot_id], dtype=little)
    blocks, parts, held = [], [], 0
    for i, doc in enumerate(encoded):
        encoded[i] = None
        parts += (doc, eot)
        held += len(doc) + 1
        if held >= WRITE_CHUNK_TOKENS:
            blocks.append(np.concatenate(parts, dtype=little, casting="same_kind"))
            parts, held = [], 0
    if parts:
        blocks.append(np.concatenate(parts, dtype=little, casting="same_kind"))
    return blocks


def _token_slices(blocks: list, start: int, stop: int):
    """Tokens start..stop-1 of the stream in `blocks`, as views of WRITE_CHUNK_TOKENS tokens
    at most (what is counted at once: np.bincount copies its input as int64)."""
    pos = 0
    for block in blocks:
        lo, hi = max(start - pos, 0), min(stop - pos, len(block))
        pos += len(block)
        for s in range(lo, hi, WRITE_CHUNK_TOKENS):
            yield block[s:min(s + WRITE_CHUNK_TOKENS, hi)]


def _write_chunks(chunks, path: Path):
    """Each array's bytes to path, in order. Not arr.tofile(path): numpy ignores the error of
    its final flush, so on a full disk the file silently lost its tail."""
    with open(path, "wb") as f:
        for arr in chunks:
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))


def json_bytes(obj) -> bytes:
    """A JSON file's bytes as the project writes them (indented, a final newline)."""
    return (to_json(obj, indent=2) + "\n").encode("utf-8")


def write_files(out: Path, files: dict, error=DataError, may_write=(), superseded=None):
    """Write each file (name -> bytes, or a function writing a path) under a temporary name,
    then rename them all into place, in order: a write or a rename that fails (disk full,
    Ctrl-C) leaves what `out` held as it was, never half replaced; `error` (a CLLMError class)
    says so. The temporary names are this writer's own (two `train` runs preparing
    data/default at once, two exports into one directory): each renames only its own whole
    files. superseded: a function giving the names of files there that the new files make
    stale (prepare: an earlier prepare's tokenizer.json beside byte data), removed after the
    last rename. may_write: the other names this kind of writer writes at other times (a BPE
    prepare's tokenizer.json, which a byte prepare does not write): a killed writer's
    temporaries of those are removed too, as those of `files` are (before, a byte prepare
    left a killed BPE prepare's .tokenizer.json.*.tmp for good)."""
    # under the lock, which first puts back the files of a writer killed between its renames:
    # its temporaries tell that it was, so they are removed only after
    with directory_lock(out, shared=False, error=error):
        _remove_dead_writers_temporaries(out, {*files, *may_write})
    tmps = {name: _temporary_path(out, name) for name in files}
    for name in files:  # a rename onto a directory fails midway, some files replaced already
        if os.path.isdir(out / name) and not os.path.islink(out / name):
            raise error(f"{out / name}: is a directory; {out} is as it was")
    try:
        for name, content in files.items():
            if isinstance(content, bytes):
                tmps[name].write_bytes(content)
            else:
                content(tmps[name])
    except BaseException as e:  # Ctrl-C too: no temporary file is left behind
        for tmp in tmps.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a directory in the way: what made the write fail
                pass
        if not isinstance(e, OSError):
            raise
        raise error(f"{out / name}: cannot write ({e.strerror or e}); {out} is as it "
                    f"was") from None
    with directory_lock(out, shared=False, error=error):
        # superseded(): the names the new files make stale, decided from what `out` holds
        # under the lock the renames are made under (no other writer's files in between);
        # removed only once every rename is in, so a failure leaves them with the old files
        stale = superseded() if superseded is not None else []
        _rename_all_or_none(out, tmps, error)
        for name in stale:
            try:
                (out / name).unlink(missing_ok=True)
            except OSError:  # the new files are in; a stale file left is what was before
                pass


def _rename_all_or_none(out: Path, tmps: dict, error):
    """Rename each temporary (name -> path) into place, in order. Each file replaced is kept
    under a name of this writer's (_kept_path, by _keep), and each name that held no file is
    marked (_missing_mark_path), until the last rename; anything that stops the renames
    midway (Ctrl-C, an OSError) puts those back and removes the rest (_put_back), so `out`
    holds its old files or all the new ones, never some of each (before, a Ctrl-C between two
    renames left a new train.bin beside the old meta.json). What to undo is read from the
    directory, not from a record a Ctrl-C could land before: a temporary gone was renamed in.
    A writer killed midway (kill -9) leaves the same names, which the next process to take the
    directory's lock reads to put the old files back (_undo_dead_writers_renames).
    A checkpoint gets the same by renaming one whole directory into place."""
    try:
        for name, tmp in tmps.items():
            if os.path.lexists(out / name):
                _keep(out / name, _kept_path(tmp))
            else:
                _missing_mark_path(tmp).touch()
            os.replace(tmp, out / name)
    except BaseException as e:
        if not any(os.path.lexists(tmp) for tmp in tmps.values()):
            # a Ctrl-C after the last rename: every new file is in place, and stays (undone,
            # a kill midway would leave marks and no temporary: read as renames finished)
            _remove_marks(tmps.values())
            raise
        _put_back(out, list(tmps.items()))
        if not isinstance(e, OSError):
            raise
        raise error(f"{out / name}: cannot put in place ({e.strerror or e}); {out} is as it "
                    f"was") from None
    _remove_marks(tmps.values())


def _put_back(out: Path, renames: list):
    """Undo renames (name, temporary) stopped midway: each file kept put back, each name that
    held no file freed of the one renamed in; then every temporary removed. Only then: a
    process killed while putting back leaves marks beside temporaries still, which the next
    reads as renames still to undo, not as renames finished."""
    for name, tmp in reversed(renames):
        kept, missing = _kept_path(tmp), _missing_mark_path(tmp)
        if os.path.lexists(kept):
            try:
                # does nothing where the name still holds that file (rename(2) of two links
                # to one file): the link is removed below
                os.replace(kept, out / name)
            except FileNotFoundError:  # put back meanwhile by another reader of a dead writer's
                pass
            kept.unlink(missing_ok=True)
        elif os.path.lexists(missing):
            if not os.path.lexists(tmp):  # renamed in, over no file
                (out / name).unlink(missing_ok=True)
            missing.unlink(missing_ok=True)
    for _, tmp in renames:
        tmp.unlink(missing_ok=True)


def _remove_marks(tmps):
    """The kept copies and marks of renames that all happened: the files they name are new."""
    for tmp in tmps:
        for mark in (_kept_path(tmp), _missing_mark_path(tmp)):
            try:
                mark.unlink(missing_ok=True)
            except OSError:  # a read-only directory (a reader's clean-up): left, harmless
                pass


def _kept_path(tmp: Path) -> Path:
    """Where the file a temporary replaces is kept until the last rename: the temporary's name
    ending .kept: this writer's, told from a temporary by its name alone (if this writer is
    killed, the next process reads from the directory what to put back)."""
    return tmp.with_suffix(".kept")


def _missing_mark_path(tmp: Path) -> Path:
    """An empty file saying that the temporary's name held no file when it was renamed in:
    a dead writer's renames are undone by removing that file (no kept copy tells it)."""
    return tmp.with_suffix(".none")


def _keep(path: Path, kept: Path):
    """`path`'s file also under the name `kept`: a hard link, so that `path` never goes
    missing (a reader where the directory cannot be locked finds it); where the filesystem has
    no hard links, renamed aside (the lock keeps readers out while it is missing)."""
    try:
        os.link(path, kept, follow_symlinks=False)
    except OSError:
        os.replace(path, kept)


@contextlib.contextmanager
def directory_lock(out: Path, shared: bool, error=DataError):
    """flock on the directory itself (no lock file left in it). Exclusive: one writer's
    renames into `out` at a time: two writers' interleaved would leave one's train.bin beside
    the other's meta.json; this way the last to rename puts all its files. Shared: a reader
    opening the files (TokenDataset) sees them all from one writer, none renamed over between
    its opens; what it has open outlives the renames that follow. Where the filesystem has no
    such locks (some network filesystems) both go ahead unlocked, as before.
    Taken, it first puts back the old files of a writer killed between its renames
    (_undo_dead_writers_renames): `error` (a CLLMError class) where they cannot be."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY) if fcntl is not None else None
    except OSError:
        fd = None
    if fd is None:
        _undo_dead_writers_renames(out, False, error)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        _undo_dead_writers_renames(out, locked, error)
        yield  # the lock goes with the descriptor's close
    finally:
        os.close(fd)


# a writer's temporary name: .NAME.PID.NAMESPACE.RANDOM.tmp: its pid and the namespace that
# pid means something in, so that another writer in that namespace can tell it is dead; .kept
# and .none in place of .tmp: the file its rename replaced, or the mark that there was none
_TEMPORARY_RE = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<namespace>[0-9a-f]{8})"
                           r"\.(?P<random>[0-9a-f]{8})\.(?P<kind>tmp|kept|none)")


def _temporary_path(out: Path, name: str) -> Path:
    """Where this writer writes `name` before renaming it into place: a name no other writer
    uses, by its pid and a random suffix (two threads of one process differ in the suffix)."""
    return out / f".{name}.{os.getpid()}.{_pid_namespace()}.{token_hex(4)}.tmp"


@functools.lru_cache(maxsize=None)
def _pid_namespace() -> str:
    """8 hex digits naming where this process's pid is a process: this machine (its name),
    this boot of its kernel (Linux's boot_id, which a Docker container shares with its host)
    and this pid namespace (a container's own). A writer in a container beside one on the
    host, or on another machine sharing the directory over NFS, has another: its pid tells
    nothing here, its temporaries are never taken for a dead writer's."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:  # not Linux, or no /proc: the parts there are
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _dead_writers_leftovers(out: Path, own_pid_dead: bool) -> dict:
    """{pid: [matches of _TEMPORARY_RE]}: the temporaries, kept copies and marks in `out` of
    the writers in this pid namespace that are not running; those of a writer in another
    (another container, another machine) are never listed: whether it runs cannot be told
    from here. own_pid_dead: whether this process's own pid names an earlier process's
    leftovers (pid 1 in a container restarted), which only a caller holding the directory's
    lock, exclusive of every renaming writer, can say."""
    from .checkpoint import _pid_alive  # the rule checkpoint leftovers are removed by
    try:
        entries = os.listdir(out)
    except OSError:  # not there yet, or unreadable: what reads or writes it says why
        return {}
    found = {}
    for entry in entries:
        m = _TEMPORARY_RE.fullmatch(entry)
        if m and m["namespace"] == _pid_namespace():
            found.setdefault(m["pid"], []).append(m)
    return {pid: ms for pid, ms in found.items()
            if (own_pid_dead if int(pid) == os.getpid() else not _pid_alive(pid))}


def _remove_dead_writers_temporaries(out: Path, names):
    """The temporaries of `names` that a writer killed midway (kill -9) left in `out`:
    train.bin's is as large as the corpus. A running writer's are its work in progress."""
    for found in _dead_writers_leftovers(out, own_pid_dead=False).values():
        for m in found:
            if m["kind"] == "tmp" and m["name"] in names:
                try:
                    os.unlink(out / m.string)
                except OSError:  # a directory, or gone already: not ours to force
                    pass


def _undo_dead_writers_renames(out: Path, locked: bool, error):
    """A writer killed (kill -9, a SIGTERM) between two of its renames left the new files it
    renamed in beside the old ones it had not reached, the files replaced kept under its
    .kept names: a reader opened the mix, and the next writer removed the kept copies with
    the dead writer's temporaries (before 2026-12-02). Its marks (.kept, .none) beside
    temporaries not yet renamed in say so: its old files are put back, as its own
    _rename_all_or_none would have (marks without temporaries: every rename was done, the
    marks are removed). Under the directory's lock (`locked`) a writer named by this
    process's own pid is an earlier process's: none of this process's threads can be between
    renames, each renames under the lock, exclusive. `error` where the old files cannot be
    put back (a reader on a read-only mount)."""
    for pid, found in _dead_writers_leftovers(out, own_pid_dead=locked).items():
        if all(m["kind"] == "tmp" for m in found):  # killed while writing: nothing renamed
            continue
        # each leftover's temporary (_kept_path and _missing_mark_path change its suffix)
        tmps = {(out / m.string).with_suffix(".tmp"): m["name"] for m in found}
        if not any(m["kind"] == "tmp" for m in found):
            _remove_marks(tmps)
            continue
        try:
            _put_back(out, [(name, tmp) for tmp, name in tmps.items()])
        except OSError as e:
            raise error(f"{out}: a writer (pid {pid}) was killed between renaming its files "
                        f"in, and the files it replaced cannot be put back ({e.strerror or e}); "
                        f"write it again (prepare, or export)") from None


# ------------------------------------------------------------------ reading
_SCAN_LIMIT = 1 << 28  # bytes; larger files are range-checked on sampled chunks and per batch


class TokenDataset:
    """Memory-mapped train/val token streams with validated metadata."""

    def __init__(self, data_dir, vocab_size: int | None = None):
        self.dir = Path(data_dir)
        self.splits = {}
        self._batches_fit = set()  # (B, T) shapes check_batch_fits passed
        # meta.json and the token files from one writer: a prepare renaming its files into
        # place meanwhile (write_files) waits until they are mapped
        with directory_lock(self.dir, shared=True):
            self.meta = read_meta(self.dir)
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self.vocab_size = self.meta["vocab_size"]
            if vocab_size is not None:
                self.require_vocab(vocab_size)
            for split in ("train", "val"):
                self.splits[split] = self._map(split)
        for split in ("train", "val"):
            self._range_check(self.dir / f"{split}.bin", self.splits[split])

    def require_vocab(self, vocab_size: int):
        """The data's ids fit a model of `vocab_size` ids. Asked apart from opening where the
        data's tokenizer is checked first (of this meta.json, not of another read of it):
        another tokenizer is the reason the sizes would differ."""
        if self.vocab_size > vocab_size:
            raise DataError(f"{self.dir / 'meta.json'}: data vocab_size {self.vocab_size} "
                            f"exceeds the model's vocab_size {vocab_size}")

    def _map(self, split):
        """split.bin memory-mapped, its size checked against meta.json's count: the size of
        the file opened, not of whatever the name means by the time it is mapped."""
        path = self.dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path}: missing")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise DataError(f"{path}: empty")
            if size % self.dtype.itemsize:
                raise DataError(f"{path}: size {size} is not a multiple of "
                                f"{self.dtype.itemsize} bytes ({self.dtype.name}); truncated "
                                f"or wrong dtype")
            n = size // self.dtype.itemsize
            want = self.meta.get(f"{split}_tokens")
            if want is not None and want != n:
                raise DataError(f"{path}: holds {n} tokens but meta.json says {want} "
                                f"(truncated, or written with another dtype)")
            return np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))

    def _range_check(self, path, arr):
        if arr.nbytes <= _SCAN_LIMIT:
            starts, w = [0], arr.size
        else:  # sample 64 evenly spaced 1 MiB windows: cheap on any size
            starts, w = range(0, arr.size, max(1, arr.size // 64)), (1 << 20) // arr.itemsize
        for start in starts:
            ch = arr[start:start + w]
            hi = int(ch.max())
            if hi >= self.vocab_size:  # the data's own: never above the model's (checked)
                pos = start + int(np.argmax(np.asarray(ch) >= self.vocab_size))
                raise DataError(f"{path}: token id {hi} >= vocab_size {self.vocab_size} "
                                f"(first bad id near token {pos})")

    def num_tokens(self, split):
        return int(self.splits[split].size)

    def require_block(self, T: int, splits=("train", "val")):
        """Each split read (default both) holds one window of T + 1 tokens."""
        for split in splits:
            arr = self.splits[split]
            if arr.size < T + 1:
                more = "more data" if split == "train" else "a larger prepare --val-fraction"
                tokens = "1 token" if arr.size == 1 else f"{arr.size} tokens"
                raise DataError(f"{self.dir / (split + '.bin')}: {tokens} is shorter than one "
                                f"block of {T} + 1 tokens; use a smaller --seq-len or {more}")

    def require_batch(self, B: int, T: int, host: HostMemory | None = None):
        """check_batch_fits for get_batch's (B, T), once per shape (available_memory reads
        /proc): the trainer asks before the run directory is touched. host: the memory
        available to the ranks of one host before any allocated (their B rows between them),
        instead of the memory available now."""
        if (B, T) not in self._batches_fit:
            # the int64 windows get_batch reads, and the model's int32 idx and targets of
            # them (check_batch), made while the windows are still held
            check_batch_fits(B, T + 1, row_bytes=(T + 1) * 8 + 2 * T * 4,
                             free=None if host is None else host.free)
            self._batches_fit.add((B, T))

    def get_batch(self, split: str, B: int, T: int, rng: np.random.Generator, rows=None):
        """Random windows: idx (B, T) int64 and targets = idx shifted by one. rows (indices
        into the B windows): read only those (data parallelism: every rank draws the whole
        global batch from the shared stream and reads its own part)."""
        # the ids held are the rows read (this rank's part), not the B windows drawn
        self.require_batch(B if rows is None else len(rows), T)
        arr = self.splits[split]
        starts = rng.integers(0, arr.size - T, size=B)
        if rows is not None:
            starts = starts[rows]
        buf = np.stack([np.asarray(arr[s:s + T + 1]) for s in starts]).astype(np.int64)
        return buf[:, :-1], buf[:, 1:]


def check_batch_fits(batch: int, tokens: int, row_bytes: int | None = None,
                     free: int | None = None):
    """ConfigError naming --batch-size when the ids of `batch` sequences of `tokens` cannot be
    held (row_bytes per sequence: all the copies held at once; default one int64 copy) in the
    host memory available (`free`, default available_memory read now): past
    sys.maxsize bytes NumPy makes no array (its ValueError, not a MemoryError, was a
    traceback); past the host memory available (every backend builds the batch on the host)
    it was built one window at a time for minutes, then killed."""
    need, room = batch * (tokens * 8 if row_bytes is None else row_bytes), sys.maxsize
    if free is None:
        free = available_memory(np)
    where = "any array can hold"
    if free is not None and free < room:
        room, where = free, "the host memory available"
    if need > room:
        raise ConfigError(f"a batch of {batch:,} sequences of {tokens:,} tokens needs "
                          f"{format_bytes(need)} for its token ids alone, more than {where} "
                          f"({format_bytes(room)}); use a smaller --batch-size (in training: "
                          f"--batch-size x --grad-accum-steps x the ranks on one host)")


def read_meta(data_dir: Path) -> dict:
    """A token directory's meta.json, validated (DataError naming the file otherwise)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (run `cllm-gpu prepare`)")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        # a directory, FIFO or broken link there: damaged data, not data never prepared
        what = "not a regular file" if os.path.lexists(meta_path) else "missing"
        raise DataError(f"{meta_path}: {what} (run `cllm-gpu prepare`)")
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise DataError(f"{meta_path}: cannot read ({e.strerror or e})") from None
    return validate_meta(parse_json(raw, meta_path, DataError), meta_path)


def validate_meta(meta, where="meta.json") -> dict:
    """Check the fields of a data meta.json; return it (with defaults) or raise DataError."""
    if not isinstance(meta, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{where}: missing field {key!r}")
    vs = meta["vocab_size"]
    if isinstance(vs, bool) or not isinstance(vs, int) or vs < 1 or vs > 2**32 - 1:
        raise DataError(f"{where}: vocab_size must be a positive integer < 2**32, got {vs!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{where}: dtype must be 'uint16' or 'uint32', got {meta['dtype']!r}")
    if meta["dtype"] == "uint16" and vs > 65536:
        raise DataError(f"{where}: vocab_size {vs} does not fit dtype uint16")
    for key in ("train_tokens", "val_tokens"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise DataError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    if not isinstance(meta["tokenizer"], str):
        raise DataError(f"{where}: tokenizer must be a string")
    # joined to the data directory: a path there would read (and export would copy) any file
    name = meta.get("tokenizer_file", "tokenizer.json")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise DataError(f"{where}: tokenizer_file must be a file name in the data directory, "
                        f"got {name!r}")
    if not isinstance(meta.get("tokenizer_sha256", ""), str):
        raise DataError(f"{where}: tokenizer_sha256 must be a string, got "
                        f"{meta['tokenizer_sha256']!r}")
    # its text: export writes it into tokenizer_config.json as bos_token / eos_token
    if not isinstance(meta.get("eot_token", ""), str):
        raise DataError(f"{where}: eot_token must be a string, got {meta['eot_token']!r}")
    if not isinstance(meta.get("add_special_tokens", False), bool):
        raise DataError(f"{where}: add_special_tokens must be true or false, got "
                        f"{meta['add_special_tokens']!r}")
    eot = meta.get("eot_id")  # absent in data prepared before end-of-text existed
    if eot is not None and (isinstance(eot, bool) or not isinstance(eot, int)
                            or not 0 <= eot < vs):
        raise DataError(f"{where}: eot_id must be a token id in [0, {vs}), got {eot!r}")
    return meta
