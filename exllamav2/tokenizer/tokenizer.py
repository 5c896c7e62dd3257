"""ExLlamaV2Tokenizer: text <-> token id tensors for a model directory.

tokenizer.json is read with HF `tokenizers` (preferred); tokenizer.model with `sentencepiece`.
Special tokens found in the text (chat markers, BOS/EOS) become their ids only with
``encode_special_tokens=True``; otherwise they are encoded as plain text. Added tokens the
backend library does not handle itself (e.g. added_tokens.json entries past a SentencePiece
vocabulary) are split out and mapped here.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import InputError, InputTypeError, ModelFileNotFoundError, TokenizerError
from ..inputs import check_text
from .added_tokens import read_added_tokens, read_json_object
from .base import ExLlamaV2TokenizerBase
from .hf import ExLlamaV2TokenizerHF

if TYPE_CHECKING:
    from exllamav2.generator import ExLlamaV2MMEmbedding

log = logging.getLogger(__name__)

# Piece for ids inside the vocabulary range that no token file defines; matches no real text.
UNDEFINED_PIECE = "\ufffd\ufffd_undefined_token_\ufffd\ufffd"
MAX_CACHED_STRINGS = 100


def _open_backend(
    model_dir: str, force_json: bool, force_spm: bool
) -> tuple[ExLlamaV2TokenizerBase, dict[str, Any] | None]:
    """The backend to use and the parsed tokenizer.json (None when absent)."""
    path_json = os.path.join(model_dir, "tokenizer.json")
    path_spm = os.path.join(model_dir, "tokenizer.model")
    spec = read_json_object(path_json) if os.path.exists(path_json) else None

    if spec is not None and not force_spm:
        log.debug("Tokenizer: HF tokenizers, %s", path_json)
        return _load_backend(path_json, lambda: ExLlamaV2TokenizerHF(path_json, spec)), spec
    if os.path.exists(path_spm):
        if force_json:
            log.warning("force_json=True but %s has no tokenizer.json; using tokenizer.model", model_dir)
        from .spm import ExLlamaV2TokenizerSPM  # sentencepiece is only needed for these models

        log.debug("Tokenizer: SentencePiece, %s", path_spm)
        return _load_backend(path_spm, lambda: ExLlamaV2TokenizerSPM(path_spm)), spec
    if force_spm:
        raise ModelFileNotFoundError(
            f"force_spm=True but {path_spm} does not exist; pass force_spm=False to use tokenizer.json"
        )
    raise ModelFileNotFoundError(
        f"No tokenizer in {model_dir!r}: looked for tokenizer.json (HF tokenizers) and "
        "tokenizer.model (SentencePiece). Copy the tokenizer files of the original model there."
    )


def _load_backend(path: str, make: Callable[[], ExLlamaV2TokenizerBase]) -> ExLlamaV2TokenizerBase:
    """The backend libraries (tokenizers, sentencepiece) refuse a corrupt file with a bare Exception or
    RuntimeError that names no file; name it."""
    try:
        backend = make()
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
        raise TokenizerError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e)[:200]}); the file is "
                             f"corrupt or from an unsupported tokenizer version: re-download it") from e
    if backend.vocab_size() <= 0:
        raise TokenizerError(f"{path}: the vocabulary is empty; re-download the model's tokenizer files")
    return backend


def _built_once(attr: str) -> Callable:
    """Decorate a builder so its result is made once (thread-safe) and stored on `attr`."""

    def wrap(build: Callable) -> Callable:
        @functools.wraps(build)
        def get(self: "ExLlamaV2Tokenizer"):
            value = getattr(self, attr)
            if value is None:
                with self._build_lock:
                    value = getattr(self, attr)
                    if value is None:
                        value = build(self)
                        setattr(self, attr, value)
            return value

        return get

    return wrap


def _single_id(value: Any) -> int | None:
    """config.json may list several EOS ids; the first is the one we use."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _split_pattern(pieces: Sequence[str]) -> re.Pattern | None:
    """A regex that splits text around any of `pieces`, longest piece winning."""
    pieces = sorted((p for p in pieces if p), key=len, reverse=True)
    if not pieces:
        return None
    return re.compile("(" + "|".join(map(re.escape, pieces)) + ")")


class ExLlamaV2Tokenizer:

    class Trie:
        """Char trie over token pieces: `leaf` holds the ids whose piece ends at this node."""

        __slots__ = ("children", "leaf")

        def __init__(self, children: dict | None = None, leaf: list | None = None) -> None:
            self.children: dict[str, ExLlamaV2Tokenizer.Trie] = children if children is not None else {}
            self.leaf: list[int] = leaf if leaf is not None else []

    # Clients (TabbyAPI) reset these on the class before making a tokenizer. Every instance
    # gets its own dicts in __init__, so those resets are harmless and nothing leaks between models.
    unspecial_piece_to_id: dict[str, int] = {}
    unspecial_id_to_piece: dict[int, str] = {}
    extended_piece_to_id: dict[str, int] = {}
    extended_id_to_piece: dict[int, str] = {}

    def __init__(self, config: Any, lazy_init: bool = True, force_json: bool = False, force_spm: bool = False) -> None:
        """`config` needs `model_dir` and may set `bos_token_id`, `eos_token_id`, `pad_token_id`,
        `vocab_size`. `force_spm` loads tokenizer.model even when tokenizer.json exists;
        `force_json` only warns when it has to fall back to tokenizer.model. With
        `lazy_init=False` the piece lists, prefix dicts and tries are built now, not on first use."""
        self.config = config
        model_dir = str(config.model_dir)
        self.tokenizer_model, spec = _open_backend(model_dir, force_json, force_spm)
        backend = self.tokenizer_model

        added = read_added_tokens(model_dir, spec)
        self.tokenizer_config_dict: dict[str, Any] | None = added.tokenizer_config
        self.extended_piece_to_id = dict(added.special)
        # Non-special added tokens the backend already reproduces need no handling here
        self.unspecial_piece_to_id = {
            piece: idx for piece, idx in added.unspecial.items() if not self._backend_has(piece, idx)
        }

        self._resolve_special_tokens(config)
        self.actual_vocab_size = 1 + max(
            [*self.extended_id_to_piece, *self.unspecial_id_to_piece, backend.vocab_size() - 1]
        )

        self.newline_token = "\n"
        self.space_token = " "
        self.newline_token_id = self._last_id(self.newline_token)
        self.space_token_id = self._last_id(self.space_token)

        self.tokenized_str_cache: dict[str, torch.Tensor] = {}
        self.max_cached_strings = MAX_CACHED_STRINGS
        # pieces split out of text / inserted into decoded text by us, per special mode
        self._own_pieces: dict[bool, tuple[dict[int, str], dict[str, int], re.Pattern | None]] = {}

        self._build_lock = threading.RLock()
        self.id_to_ord: list[int] | None = None
        self.id_to_piece: list[str] | None = None
        self.id_to_piece_with_special: list[str] | None = None
        self.piece_to_id: dict[str, int] | None = None
        self.prefix_to_ids: dict[str, list[int]] | None = None
        self.prefix_id_to_ids: dict[int, list[int]] | None = None
        self.char_trie: ExLlamaV2Tokenizer.Trie | None = None
        self.char_trie_ci: ExLlamaV2Tokenizer.Trie | None = None
        if not lazy_init:
            self.get_id_to_ord_list()
            self.get_id_to_piece_list(include_special_tokens=True)
            self.get_prefix_id_to_ids_dict()
            self.get_char_trie()
            self.get_char_trie_ci()

    @property
    def tokenizer(self) -> ExLlamaV2TokenizerBase:
        """Older name of `tokenizer_model`."""
        return self.tokenizer_model

    # setup helpers ---------------------------------------------------------------------------

    def _resolve_special_tokens(self, config: Any) -> None:
        """BOS/EOS/PAD/UNK ids (the model config first, then tokenizer_config.json) and their pieces."""
        backend = self.tokenizer_model
        self.unk_token_id = backend.unk_id()
        self.bos_token_id = self._resolve_id("bos_token", getattr(config, "bos_token_id", None), 1)
        self.eos_token_id = self._resolve_id("eos_token", getattr(config, "eos_token_id", None), 2)
        self.pad_token_id = self._resolve_id("pad_token", getattr(config, "pad_token_id", None), None)
        if self.pad_token_id is None:
            self.pad_token_id = self._fallback_pad_id()

        self.extended_id_to_piece = {idx: piece for piece, idx in self.extended_piece_to_id.items()}
        self.unspecial_id_to_piece = {idx: piece for piece, idx in self.unspecial_piece_to_id.items()}

        self.unk_token = backend.unk_token() or self._token_text(self.unk_token_id)
        self.bos_token = self._token_text(self.bos_token_id)
        self.eos_token = self._token_text(self.eos_token_id)
        self.pad_token = self._token_text(self.pad_token_id)
        # Control tokens must be recognisable in text with encode_special_tokens=True. An id
        # that is ordinary text to the backend (a default BOS 1 in a byte-level vocab) stays text.
        for piece, idx in (
            (self.unk_token, self.unk_token_id),
            (self.bos_token, self.bos_token_id),
            (self.eos_token, self.eos_token_id),
        ):
            if piece and idx is not None and self._is_control(idx):
                self.extended_piece_to_id[piece] = idx
                self.extended_id_to_piece[idx] = piece

    def _backend_has(self, piece: str, idx: int) -> bool:
        if idx >= self.tokenizer_model.vocab_size():
            return False
        return self.tokenizer_model.decode([idx], skip_special=False) == piece

    def _is_control(self, idx: int) -> bool:
        backend = self.tokenizer_model
        return idx >= backend.vocab_size() or backend.token_bytes(idx) is None

    def _find_piece(self, piece: str) -> int | None:
        for table in (self.extended_piece_to_id, self.unspecial_piece_to_id):
            if piece in table:
                return table[piece]
        return self.tokenizer_model.piece_to_id(piece)

    def _resolve_id(self, key: str, configured: Any, default: int | None) -> int | None:
        """The model config wins; else tokenizer_config.json's token string; else `default`."""
        configured = _single_id(configured)
        if configured is not None:
            return configured
        tc = self.tokenizer_config_dict
        if not tc or key not in tc:
            return default
        entry = tc[key]
        content = entry.get("content") if isinstance(entry, dict) else entry
        return self._find_piece(content) if isinstance(content, str) else None

    def _fallback_pad_id(self) -> int:
        pad = self._find_piece("<pad>")
        if pad is not None:
            return pad
        if self.eos_token_id is not None and self.eos_token_id != self.bos_token_id:
            return self.eos_token_id
        return -1

    def _token_text(self, idx: int | None) -> str:
        if idx is None or idx < 0:
            return ""
        return self.extended_id_to_piece.get(idx) or self.tokenizer_model.id_to_piece(idx)

    def _last_id(self, text: str) -> int | None:
        ids = self.tokenizer_model.encode(text)
        return ids[-1] if ids else None

    def _own(self, special: bool) -> tuple[dict[int, str], dict[str, int], re.Pattern | None]:
        """Added tokens the backend won't handle itself in this mode: (id -> piece,
        piece -> id, split regex). Built on first use, like upstream."""
        own = self._own_pieces.get(special)
        if own is None:
            # unspecial entries are by construction tokens the backend can't reproduce
            piece_to_id = dict(self.unspecial_piece_to_id)
            if special:
                matched = self.tokenizer_model.parsed_added_tokens()
                piece_to_id.update(
                    {p: i for p, i in self.extended_piece_to_id.items() if matched.get(p) != i}
                )
            id_to_piece = {i: p for p, i in piece_to_id.items()}
            own = (id_to_piece, piece_to_id, _split_pattern(list(piece_to_id)))
            self._own_pieces[special] = own
        return own

    # encoding --------------------------------------------------------------------------------

    def _encode_text(self, text: str, special: bool) -> list[int]:
        _, piece_to_id, pattern = self._own(special)
        if pattern is None:
            return self.tokenizer_model.encode(text, special)
        ids: list[int] = []
        # re.split with one group alternates plain text (even) and matched pieces (odd)
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                ids.append(piece_to_id[part])
            elif part:
                ids += self.tokenizer_model.encode(part, special)
        return ids

    def encode_special(self, text: str) -> list[int]:
        """Ids for `text`, special tokens in it parsed as such."""
        return self._encode_text(text, True)

    def encode_unspecial(self, text: str) -> list[int]:
        """Ids for `text`, special tokens in it encoded as plain text."""
        return self._encode_text(text, False)

    def encode_special_or_unspecial(
        self, text: str, special: bool, embeddings: Sequence["ExLlamaV2MMEmbedding"] | None = None
    ) -> list[int]:
        """Like encode_(un)special, with each embedding's `text_alias` replaced by its ids."""
        if not embeddings:
            return self._encode_text(text, special)
        aliases = {e.text_alias: e for e in embeddings}
        pattern = _split_pattern(list(aliases))
        ids: list[int] = []
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                ids += [int(i) for i in aliases[part].get_ids()]
            elif part:
                ids += self._encode_text(part, special)
        return ids

    def encode(
        self,
        text: str | list[str],
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
        return_offsets: bool = False,
        embeddings: Sequence["ExLlamaV2MMEmbedding"] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """LongTensor (batch, len) of ids. A list of strings is left-padded with the pad id;
        `return_offsets` also returns int32 (batch,) offsets, -(padding length) per row."""
        check_text(text)
        texts = text if isinstance(text, list) else [text]
        seqs = [self.encode_special_or_unspecial(t, encode_special_tokens, embeddings) for t in texts]
        for seq in seqs:
            if add_bos and self.bos_token_id is not None:
                seq.insert(0, self.bos_token_id)
            if add_eos and self.eos_token_id is not None:
                seq.append(self.eos_token_id)

        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        if not return_offsets:
            return ids
        offsets = torch.tensor([len(s) - width for s in seqs], dtype=torch.int)
        return ids, offsets

    def cached_encode_str(self, text: str) -> torch.Tensor:
        """`encode(text)`, remembering the last `max_cached_strings` distinct strings."""
        cached = self.tokenized_str_cache.get(text)
        if cached is not None:
            return cached
        while len(self.tokenized_str_cache) >= self.max_cached_strings:
            del self.tokenized_str_cache[next(iter(self.tokenized_str_cache))]  # oldest first
        ids = self.encode(text)
        self.tokenized_str_cache[text] = ids
        return ids

    def num_tokens(self, text: str) -> int:
        return len(self.tokenizer_model.encode(text))

    # decoding --------------------------------------------------------------------------------

    def _decode_seq(self, seq: list[int], special: bool) -> str:
        pad, eos = self.pad_token_id, self.eos_token_id
        start = 0
        while start < len(seq) and seq[start] == pad:  # left padding
            start += 1
        seq = seq[start:]
        if not special and eos in seq:
            seq = seq[: seq.index(eos)]
        if pad != eos:
            seq = [t for t in seq if t != pad]

        own, _, _ = self._own(special)
        limit = self.tokenizer_model.vocab_size()
        parts: list[str] = []
        run: list[int] = []
        for t in seq:
            if t in own:
                if run:
                    parts.append(self.tokenizer_model.decode(run, skip_special=not special))
                    run = []
                parts.append(own[t])
            elif 0 <= t < limit:
                run.append(t)
        if run:
            parts.append(self.tokenizer_model.decode(run, skip_special=not special))
        return "".join(parts)

    def decode(
        self, ids: torch.Tensor | list[torch.Tensor] | list[int], decode_special_tokens: bool = False
    ) -> str | list[str]:
        """A 1-D tensor (or list of ints) gives a str, a 2-D tensor or a list of tensors a
        list[str] (even for one row). Without `decode_special_tokens`, special tokens are
        dropped and each sequence ends at its first EOS; pad tokens are always dropped."""
        if isinstance(ids, list):
            if ids and all(isinstance(t, int) for t in ids):
                return self._decode_seq(ids, decode_special_tokens)
            return [self.decode(t, decode_special_tokens) for t in ids]
        if not isinstance(ids, torch.Tensor):
            raise InputTypeError(f"decode() takes a tensor or a list of tensors, not {type(ids).__name__}; "
                                 f"pass token ids, e.g. tokenizer.decode(output_ids[0])")
        if ids.dim() > 2:
            raise InputError(f"decode() takes 1-D or 2-D ids, got shape {tuple(ids.shape)}")
        if (ids.is_floating_point() or ids.is_complex()) and ids.numel():     # torch.tensor([]) is float32
            raise InputTypeError(f"decode() takes integer token ids, got dtype {ids.dtype}; convert with ids.long()")
        if ids.dim() == 2:
            return [self._decode_seq(row, decode_special_tokens) for row in ids.tolist()]
        return self._decode_seq(ids.reshape(-1).tolist(), decode_special_tokens)

    # single tokens, masks, sizes -------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.actual_vocab_size

    def single_token(self, token_id: int) -> torch.Tensor:
        return torch.tensor([[token_id]], dtype=torch.long)

    def single_id(self, token: str) -> int | None:
        """Id of a special token or of a token whose decoded piece is exactly `token`."""
        if token in self.extended_piece_to_id:
            return self.extended_piece_to_id[token]
        return self.get_piece_to_id_dict().get(token)

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Additive half mask: -inf where `ids` is the pad id, 0 elsewhere."""
        mask = torch.zeros(ids.shape, dtype=torch.half, device=ids.device)
        return mask.masked_fill_(ids == self.pad_token_id, float("-inf"))

    # vocabulary views --------------------------------------------------------------------------

    def _token_bytes(self, idx: int) -> bytes | None:
        if idx in self.unspecial_id_to_piece:
            return self.unspecial_id_to_piece[idx].encode("utf-8")
        if idx < self.tokenizer_model.vocab_size():
            return self.tokenizer_model.token_bytes(idx)
        return None

    @_built_once("id_to_ord")
    def get_id_to_ord_list(self) -> list[int]:
        """Per id, the byte a single-byte token stands for, else -1."""
        ords = []
        for idx in range(self.actual_vocab_size):
            data = self._token_bytes(idx)
            ords.append(data[0] if data is not None and len(data) == 1 else -1)
        return ords

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        """Per id, the text the token decodes to on its own. Special tokens are "" unless
        `include_special_tokens`; ids no file defines get `UNDEFINED_PIECE`."""
        if include_special_tokens:
            return self._pieces_with_special()
        return self._pieces()

    @_built_once("id_to_piece")
    def _pieces(self) -> list[str]:
        backend_vocab = self.tokenizer_model.vocab
        pieces = []
        for idx in range(self.actual_vocab_size):
            if idx in self.unspecial_id_to_piece:
                pieces.append(self.unspecial_id_to_piece[idx])
            elif idx < len(backend_vocab):
                pieces.append(backend_vocab[idx])
            elif idx in self.extended_id_to_piece:
                pieces.append("")
            else:
                pieces.append(UNDEFINED_PIECE)
        return pieces

    @_built_once("id_to_piece_with_special")
    def _pieces_with_special(self) -> list[str]:
        pieces = list(self._pieces())
        for idx, piece in self.extended_id_to_piece.items():
            pieces[idx] = piece
        return pieces

    @_built_once("piece_to_id")
    def get_piece_to_id_dict(self) -> dict[str, int]:
        """Decoded piece -> id (the highest id where pieces repeat)."""
        return {piece: idx for idx, piece in enumerate(self.get_id_to_piece_list())}

    @_built_once("prefix_to_ids")
    def get_prefix_to_ids_dict(self) -> dict[str, list[int]]:
        """For each non-empty piece, the sorted ids of all pieces that start with it."""
        piece_to_id = self.get_piece_to_id_dict()
        prefix_to_ids: dict[str, list[int]] = {p: [] for p in piece_to_id if p}
        for piece in prefix_to_ids:
            for end in range(1, len(piece) + 1):
                ids = prefix_to_ids.get(piece[:end])
                if ids is not None:
                    ids.append(piece_to_id[piece])
        for ids in prefix_to_ids.values():
            ids.sort()
        return prefix_to_ids

    @_built_once("prefix_id_to_ids")
    def get_prefix_id_to_ids_dict(self) -> dict[int, list[int]]:
        """As `get_prefix_to_ids_dict`, keyed by the prefix piece's id; every other id maps
        to itself alone."""
        piece_to_id = self.get_piece_to_id_dict()
        result = {piece_to_id[p]: ids for p, ids in self.get_prefix_to_ids_dict().items()}
        for idx in range(getattr(self.config, "vocab_size", None) or self.actual_vocab_size):
            result.setdefault(idx, [idx])
        return result

    def _make_trie(self, case_insensitive: bool) -> "ExLlamaV2Tokenizer.Trie":
        root = ExLlamaV2Tokenizer.Trie()
        for idx, piece in enumerate(self.get_id_to_piece_list()):
            if not piece:
                continue
            node = root
            for char in piece.lower() if case_insensitive else piece:
                child = node.children.get(char)
                if child is None:
                    child = node.children[char] = ExLlamaV2Tokenizer.Trie()
                node = child
            node.leaf.append(idx)
        return root

    @_built_once("char_trie")
    def get_char_trie(self) -> "ExLlamaV2Tokenizer.Trie":
        return self._make_trie(False)

    @_built_once("char_trie_ci")
    def get_char_trie_ci(self) -> "ExLlamaV2Tokenizer.Trie":
        return self._make_trie(True)
