"""ExLlamaV2Tokenizer against `tokenizers`, `sentencepiece` and transformers on small tokenizers
trained offline (tests/tokenizer_fixtures.py). Expected values come from those libraries or
from straightforward re-derivations written here, never from our own output."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer, pre_tokenizers

from exllamav2.tokenizer import ExLlamaV2Tokenizer
from exllamav2.tokenizer.hf import BYTE_LEVEL_CHARS
from tests.tokenizer_fixtures import (
    SAMPLE_TEXTS,
    UNSPECIAL,
    corpus,
    make_config,
    write_bytelevel_bpe,
    write_metaspace_bpe,
    write_sentencepiece,
)

CHAT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay 🙂 twice<|im_end|>\n"


# fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bytelevel": write_bytelevel_bpe(root / "bytelevel"),
        "metaspace": write_metaspace_bpe(root / "metaspace"),
        "spm": write_sentencepiece(root / "spm"),
    }


@pytest.fixture(scope="module")
def toks(dirs) -> dict[str, ExLlamaV2Tokenizer]:
    return {name: ExLlamaV2Tokenizer(make_config(d)) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def refs(dirs) -> dict[str, Tokenizer | sentencepiece.SentencePieceProcessor]:
    return {
        "bytelevel": Tokenizer.from_file(str(dirs["bytelevel"] / "tokenizer.json")),
        "metaspace": Tokenizer.from_file(str(dirs["metaspace"] / "tokenizer.json")),
        "spm": sentencepiece.SentencePieceProcessor(model_file=str(dirs["spm"] / "tokenizer.model")),
    }


def hf_encode(ref: Tokenizer, text: str, special: bool) -> list[int]:
    ref.encode_special_tokens = not special
    return ref.encode(text, add_special_tokens=False).ids


def spm_encode_special(sp, text: str, specials: dict[str, int]) -> list[int]:
    """Reference for SentencePiece + added specials: find the earliest (then longest) special,
    encode the text before it with sentencepiece, emit the special's id, repeat."""
    ids: list[int] = []
    while text:
        hits = [(text.find(p), -len(p), p) for p in specials if p in text]
        if not hits:
            return ids + sp.encode(text)
        pos, _, piece = min(hits)
        if pos:
            ids += sp.encode(text[:pos])
        ids.append(specials[piece])
        text = text[pos + len(piece):]
    return ids


def spm_added(dirs) -> dict[str, int]:
    return json.loads((dirs["spm"] / "added_tokens.json").read_text())


HF_KINDS = ["bytelevel", "metaspace"]
ALL_KINDS = HF_KINDS + ["spm"]
TEXTS = SAMPLE_TEXTS + [CHAT, f"call {UNSPECIAL} now", "<s>literal</s> <unk>"]


# encoding matches the libraries --------------------------------------------------------------

@pytest.mark.parametrize("kind", HF_KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_hf_encode_matches_tokenizers(toks, refs, kind, text):
    tok, ref = toks[kind], refs[kind]
    plain = tok.encode(text)
    assert plain.dtype == torch.long and plain.shape == (1, len(hf_encode(ref, text, False)))
    assert plain[0].tolist() == hf_encode(ref, text, special=False)
    assert tok.encode(text, encode_special_tokens=True)[0].tolist() == hf_encode(ref, text, special=True)


@pytest.mark.parametrize("text", TEXTS)
def test_spm_encode_matches_sentencepiece(toks, refs, dirs, text):
    tok, sp = toks["spm"], refs["spm"]
    assert tok.encode(text)[0].tolist() == sp.encode(text)
    specials = {**spm_added(dirs), "<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    assert tok.encode(text, encode_special_tokens=True)[0].tolist() == spm_encode_special(sp, text, specials)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_matches_transformers_fast_tokenizer(toks, dirs, kind):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(dirs[kind] / "tokenizer.json"))
    tok = toks[kind]
    for text in TEXTS:
        plain = fast(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        special = fast.encode(text, add_special_tokens=False)
        assert tok.encode(text)[0].tolist() == plain
        assert tok.encode(text, encode_special_tokens=True)[0].tolist() == special
        ids = torch.tensor(special)
        assert tok.decode(ids, decode_special_tokens=True) == fast.decode(special, skip_special_tokens=False)
        # without specials we also stop at the first EOS
        cut = special.index(tok.eos_token_id) if tok.eos_token_id in special else len(special)
        assert tok.decode(ids) == fast.decode(special[:cut], skip_special_tokens=True)


# round trips and decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_round_trip(toks, refs, kind, text):
    tok, ref = toks[kind], refs[kind]
    back = tok.decode(tok.encode(text)[0])
    if kind == "metaspace":
        # prepend_scheme="first" plus the Strip decoder lose one of several leading spaces by
        # design; the library's own round trip is the reference
        assert back == ref.decode(hf_encode(ref, text, False))
    else:
        assert back == text


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_special_tokens_only_with_flag(toks, kind):
    tok = toks[kind]
    text = "<|im_start|>user\nhi<|im_end|>" if kind != "metaspace" else "<s>user\nhi</s>"
    start, end = re.findall(r"<[^>]+>", text)
    start_id, end_id = tok.single_id(start), tok.single_id(end)
    assert start_id == tok.extended_piece_to_id[start] and end_id == tok.extended_piece_to_id[end]

    plain = tok.encode(text)[0].tolist()
    assert start_id not in plain and end_id not in plain
    assert tok.decode(tok.encode(text)[0]) == text  # the markers survive as text

    special = tok.encode(text, encode_special_tokens=True)[0].tolist()
    assert special[0] == start_id and special[-1] == end_id
    assert start_id not in special[1:-1] and end_id not in special[1:-1]
    ids = torch.tensor(special)
    assert tok.decode(ids, decode_special_tokens=True).startswith(start)
    assert start not in tok.decode(ids)


def test_spm_added_tokens_past_vocab(toks, refs, dirs):
    tok, sp = toks["spm"], refs["spm"]
    added = spm_added(dirs)
    assert tok.tokenizer_model.vocab_size() == sp.vocab_size()
    assert tok.get_vocab_size() == tok.actual_vocab_size == sp.vocab_size() + len(added)
    for piece, idx in added.items():
        assert tok.extended_id_to_piece[idx] == piece
        assert tok.get_id_to_piece_list(include_special_tokens=True)[idx] == piece
        assert tok.get_id_to_piece_list()[idx] == ""
    ids = tok.encode(CHAT, encode_special_tokens=True)[0]
    assert tok.decode(ids, decode_special_tokens=True) == CHAT
    # without specials the markers vanish and the text between them is sentencepiece's decode
    body = [i for i in ids.tolist() if i < sp.vocab_size()]
    assert tok.decode(ids) == sp.decode(body)


def test_longest_special_wins(tmp_path):
    d = write_sentencepiece(tmp_path / "m")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    size = sp.vocab_size()
    added = {"<x>": size, "<x>y": size + 1, "y<x>": size + 2}
    (d / "added_tokens.json").write_text(json.dumps(added))
    tok = ExLlamaV2Tokenizer(make_config(d))
    specials = {**added, "<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    for text in ("a<x>yb", "<x><x>y", "y<x>y", "ay<x>"):
        assert tok.encode(text, encode_special_tokens=True)[0].tolist() == spm_encode_special(sp, text, specials)


def test_unspecial_added_token(toks, refs):
    tok, ref = toks["bytelevel"], refs["bytelevel"]
    tool_id = ref.token_to_id(UNSPECIAL)
    for special in (False, True):
        ids = tok.encode(f"a {UNSPECIAL} b", encode_special_tokens=special)[0].tolist()
        assert tool_id in ids
        assert tok.decode(torch.tensor(ids), decode_special_tokens=special) == f"a {UNSPECIAL} b"
    assert UNSPECIAL not in tok.extended_piece_to_id
    assert tok.get_id_to_piece_list()[tool_id] == UNSPECIAL


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_left_padding_offsets_and_mask(toks, kind):
    tok = toks[kind]
    texts = ["short", "a much longer line of text\nwith two lines", ""]
    singles = [tok.encode(t, add_bos=True)[0].tolist() for t in texts]
    ids, offsets = tok.encode(texts, add_bos=True, return_offsets=True)
    width = max(map(len, singles))
    assert ids.dtype == torch.long and ids.shape == (3, width)
    assert offsets.dtype == torch.int32
    for row, single in enumerate(singles):
        pad_len = width - len(single)
        assert offsets[row].item() == -pad_len
        assert ids[row, :pad_len].tolist() == [tok.pad_token_id] * pad_len
        assert ids[row, pad_len:].tolist() == single

    mask = tok.padding_mask(ids)
    assert mask.dtype == torch.half and mask.shape == ids.shape
    assert torch.equal(torch.isinf(mask) & (mask < 0), ids == tok.pad_token_id)
    assert torch.all(mask[ids != tok.pad_token_id] == 0)

    assert tok.decode(ids) == [tok.decode(torch.tensor(s)) for s in singles]
    single_ids, single_offsets = tok.encode(texts[0], return_offsets=True)
    assert single_offsets.tolist() == [0] and single_ids.shape[0] == 1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_decode_shapes_and_eos_cut(toks, kind):
    tok = toks[kind]
    ids = tok.encode("first part")[0].tolist()
    tail = tok.encode(" after eos")[0].tolist()
    seq = torch.tensor(ids + [tok.eos_token_id] + tail)
    assert isinstance(tok.decode(seq), str)
    assert tok.decode(seq) == tok.decode(torch.tensor(ids)) == "first part"
    with_special = tok.decode(seq, decode_special_tokens=True)
    assert with_special.startswith("first part" + tok.eos_token) and with_special.endswith("after eos")

    as_batch = tok.decode(seq.unsqueeze(0))
    assert as_batch == ["first part"]
    assert tok.decode([seq, seq[:2]]) == ["first part", tok.decode(seq[:2])]
    assert tok.decode(ids) == "first part"  # a plain list of ints is one sequence


def test_bos_eos_added(toks):
    tok = toks["metaspace"]
    ids = tok.encode("hi", add_bos=True, add_eos=True)[0].tolist()
    assert ids[0] == tok.bos_token_id == 1 and ids[-1] == tok.eos_token_id == 2
    # Qwen-style bos_token null: add_bos adds nothing
    tok = toks["bytelevel"]
    assert tok.bos_token_id is None
    assert tok.encode("hi", add_bos=True).tolist() == tok.encode("hi").tolist()


# control token ids -----------------------------------------------------------------------------

def test_control_ids_from_tokenizer_config(toks, refs):
    bl, ms, sp = toks["bytelevel"], toks["metaspace"], toks["spm"]
    ref = refs["bytelevel"]
    assert bl.eos_token_id == ref.token_to_id("<|im_end|>") and bl.eos_token == "<|im_end|>"
    assert bl.pad_token_id == ref.token_to_id("<|endoftext|>")
    assert bl.unk_token_id is None
    assert (ms.bos_token, ms.eos_token, ms.unk_token) == ("<s>", "</s>", "<unk>")
    assert ms.unk_token_id == refs["metaspace"].token_to_id("<unk>")
    # no <pad> anywhere and EOS != BOS: EOS pads
    assert ms.pad_token_id == ms.eos_token_id
    spm = refs["spm"]
    assert (sp.bos_token_id, sp.eos_token_id, sp.unk_token_id) == (spm.bos_id(), spm.eos_id(), spm.unk_id())
    assert sp.newline_token_id == spm.encode("\n")[-1] and sp.space_token_id == spm.encode(" ")[-1]
    assert ref.decode([bl.newline_token_id]) == "\n"


def test_config_ids_take_precedence(dirs, refs):
    ref = refs["bytelevel"]
    im_start = ref.token_to_id("<|im_start|>")
    cfg = make_config(dirs["bytelevel"], bos_token_id=im_start, eos_token_id=[5, 6], pad_token_id=7)
    tok = ExLlamaV2Tokenizer(cfg)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (im_start, 5, 7)
    assert tok.bos_token == "<|im_start|>"


@pytest.mark.parametrize(
    "tokenizer_config, expected",
    [
        ({}, {"bos": 1, "eos": 2, "pad": 2}),  # defaults BOS 1, EOS 2; EOS pads
        # a dict entry with "content"; EOS == BOS leaves no pad: -1
        (
            {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_start|>"},
            {"bos": "<|im_start|>", "eos": "<|im_start|>", "pad": -1},
        ),
        # pad_token null falls back to EOS
        (
            {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": None},
            {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"},
        ),
    ],
)
def test_control_id_fallbacks(tmp_path, tokenizer_config, expected):
    d = write_bytelevel_bpe(tmp_path / "m", tokenizer_config=tokenizer_config)
    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok = ExLlamaV2Tokenizer(make_config(d))

    def want(v):
        return ref.token_to_id(v) if isinstance(v, str) else v

    assert tok.bos_token_id == want(expected["bos"])
    assert tok.eos_token_id == want(expected["eos"])
    assert tok.pad_token_id == want(expected["pad"])
    # a control id that is an ordinary text token (default BOS 1 = '"') never splits text
    text = 'say "hi" #1 <|im_start|>'
    assert tok.encode(text, encode_special_tokens=True)[0].tolist() == hf_encode(ref, text, special=True)


def test_pad_prefers_pad_piece(tmp_path):
    d = write_metaspace_bpe(tmp_path / "m")
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    pad_id = len(spec["model"]["vocab"])
    spec["added_tokens"].append(
        {"id": pad_id, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    )
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = ExLlamaV2Tokenizer(make_config(d))
    assert tok.pad_token_id == pad_id == Tokenizer.from_file(str(d / "tokenizer.json")).token_to_id("<pad>")
    assert tok.actual_vocab_size == pad_id + 1


# vocabulary views ----------------------------------------------------------------------------

def test_byte_level_alphabet_matches_tokenizers():
    assert set(BYTE_LEVEL_CHARS) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_LEVEL_CHARS.values()) == list(range(256))
    ref = Tokenizer.from_str(json.dumps({
        "version": "1.0",
        "model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(BYTE_LEVEL_CHARS)}, "merges": []},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    }))
    for i, (char, byte) in enumerate(BYTE_LEVEL_CHARS.items()):
        if byte < 128:  # a lone byte >= 0x80 is not valid UTF-8 on its own
            assert ref.decode([i]) == chr(byte)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_raw_pieces_match_backend(toks, refs, kind):
    tok, ref = toks[kind], refs[kind]
    model = tok.tokenizer_model
    assert tok.tokenizer is model
    if kind == "spm":
        assert model.vocab_size() == ref.vocab_size()
        size = ref.vocab_size()
        assert [model.id_to_piece(i) for i in range(size)] == [ref.id_to_piece(i) for i in range(size)]
    else:
        size = ref.get_vocab_size()
        assert model.vocab_size() == size
        assert [model.id_to_piece(i) for i in range(size)] == [ref.id_to_token(i) for i in range(size)]
    # formatron's use: raw piece -> id over the backend vocab, plus the `vocab` attribute
    assert hasattr(model, "vocab") and len(model.vocab) == model.vocab_size()
    raw = {model.id_to_piece(i): i for i in range(model.vocab_size())}
    assert all(model.piece_to_id(p) == i for p, i in raw.items())


def test_decoded_pieces_bytelevel(toks, refs):
    tok, ref = toks["bytelevel"], refs["bytelevel"]
    pieces = tok.get_id_to_piece_list()
    specials = {i for i, t in ref.get_added_tokens_decoder().items() if t.special}
    for i in range(ref.get_vocab_size()):
        assert pieces[i] == ("" if i in specials else ref.decode([i])), i


def test_decoded_pieces_metaspace(toks, refs):
    tok, ref = toks["metaspace"], refs["metaspace"]
    pieces = tok.get_id_to_piece_list()
    # The decoder strips the first leading space; decode after a plain letter to keep it
    anchor = ref.token_to_id("x")
    for i in range(3, ref.get_vocab_size()):
        assert pieces[i] == ref.decode([anchor, i])[1:], i
    assert pieces[:3] == ["", "", ""]
    assert pieces[3 + 0x0A] == "\n" and pieces[3 + 0x20] == " "


def test_decoded_pieces_spm(toks, refs):
    tok, sp = toks["spm"], refs["spm"]
    pieces = tok.get_id_to_piece_list()
    anchor = sp.piece_to_id("x")
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            assert pieces[i] == ""
        elif sp.is_byte(i):
            byte = int(sp.id_to_piece(i)[3:5], 16)
            assert pieces[i] == (chr(byte) if byte < 128 else "\ufffd")
        else:  # sentencepiece drops a leading space when decoding from the start
            assert pieces[i] == sp.decode([anchor, i])[1:], i


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_id_to_ord(toks, refs, kind):
    tok = toks[kind]
    ords = tok.get_id_to_ord_list()
    assert len(ords) == tok.actual_vocab_size
    # a raw piece that is one printable ASCII char stands for that byte; spaces are marked
    space = "\u0120" if kind == "bytelevel" else "\u2581"
    raw_id = refs[kind].token_to_id if kind != "spm" else refs[kind].piece_to_id
    assert ords[raw_id(space)] == 0x20
    checked = 0
    for byte in range(33, 127):
        idx = raw_id(chr(byte))
        if idx is not None and tok.tokenizer_model.id_to_piece(idx) == chr(byte):
            assert ords[idx] == byte, chr(byte)
            checked += 1
    assert checked > 50
    if kind != "bytelevel":  # byte fallback tokens <0xNN>
        for i in range(tok.tokenizer_model.vocab_size()):
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", tok.tokenizer_model.id_to_piece(i))
            if m:
                assert ords[i] == int(m.group(1), 16)
    for idx in tok.extended_id_to_piece:
        assert ords[idx] == -1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_prefix_dicts_and_tries(toks, kind):
    tok = toks[kind]
    pieces = tok.get_id_to_piece_list()
    piece_to_id = tok.get_piece_to_id_dict()
    assert piece_to_id == {p: max(i for i, q in enumerate(pieces) if q == p) for p in set(pieces)}
    assert tok.single_id(tok.eos_token) == tok.eos_token_id

    prefix_to_ids = tok.get_prefix_to_ids_dict()
    distinct = [p for p in piece_to_id if p]
    assert set(prefix_to_ids) == set(distinct)
    for p in distinct[::7]:
        assert prefix_to_ids[p] == sorted(piece_to_id[q] for q in distinct if q.startswith(p))
    prefix_id_to_ids = tok.get_prefix_id_to_ids_dict()
    assert prefix_id_to_ids[piece_to_id[distinct[0]]] == prefix_to_ids[distinct[0]]
    assert all(i in prefix_id_to_ids for i in range(tok.actual_vocab_size))

    for ci, trie in ((False, tok.get_char_trie()), (True, tok.get_char_trie_ci())):
        found: dict[str, list[int]] = {}
        stack = [("", trie)]
        while stack:
            prefix, node = stack.pop()
            if node.leaf:
                found[prefix] = sorted(node.leaf)
            stack += [(prefix + c, child) for c, child in node.children.items()]
        expected: dict[str, list[int]] = {}
        for i, p in enumerate(pieces):
            if p:
                expected.setdefault(p.lower() if ci else p, []).append(i)
        assert found == expected


def trie_entries(trie) -> dict[str, list[int]]:
    """Every string a char trie holds, with its token ids."""
    found, stack = {}, [("", trie)]
    while stack:
        prefix, node = stack.pop()
        if node.leaf:
            found[prefix] = sorted(node.leaf)
        stack += [(prefix + c, child) for c, child in node.children.items()]
    return found


def test_lazy_init_false_builds_views(dirs):
    """lazy_init=False builds every view at construction, and each equals what a lazy tokenizer's
    getter builds on first use; a lazy tokenizer builds none up front."""
    tok = ExLlamaV2Tokenizer(make_config(dirs["metaspace"]), lazy_init=False)
    lazy = ExLlamaV2Tokenizer(make_config(dirs["metaspace"]))
    views = ("id_to_ord", "id_to_piece", "id_to_piece_with_special", "piece_to_id",
             "prefix_to_ids", "prefix_id_to_ids", "char_trie", "char_trie_ci")
    built = {attr: getattr(tok, attr) for attr in views}            # read before any getter runs
    assert all(getattr(lazy, attr) is None for attr in views)
    assert built["id_to_ord"] == lazy.get_id_to_ord_list()
    assert built["id_to_piece"] == lazy.get_id_to_piece_list()
    assert built["id_to_piece_with_special"] == lazy.get_id_to_piece_list(include_special_tokens=True)
    assert built["piece_to_id"] == lazy.get_piece_to_id_dict()
    assert built["prefix_to_ids"] == lazy.get_prefix_to_ids_dict() and len(built["prefix_to_ids"]) > 100
    assert built["prefix_id_to_ids"] == lazy.get_prefix_id_to_ids_dict()
    assert trie_entries(built["char_trie"]) == trie_entries(lazy.get_char_trie())
    assert trie_entries(built["char_trie_ci"]) == trie_entries(lazy.get_char_trie_ci())
    assert trie_entries(built["char_trie"]) != trie_entries(built["char_trie_ci"])


def test_prefix_id_dict_covers_config_vocab(dirs):
    tok = ExLlamaV2Tokenizer(make_config(dirs["spm"], vocab_size=650))
    assert set(range(650)) <= set(tok.get_prefix_id_to_ids_dict())


# small members ---------------------------------------------------------------------------------

def test_small_members(toks, refs):
    tok, ref = toks["bytelevel"], refs["bytelevel"]
    assert torch.equal(tok.single_token(5), torch.tensor([[5]]))
    assert tok.num_tokens("Hello world") == len(hf_encode(ref, "Hello world", False))
    first = tok.cached_encode_str("cached")
    assert tok.cached_encode_str("cached") is first
    assert first.tolist() == tok.encode("cached").tolist()
    for n in range(tok.max_cached_strings + 5):
        tok.cached_encode_str(f"s{n}")
    assert len(tok.tokenized_str_cache) == tok.max_cached_strings and "cached" not in tok.tokenized_str_cache
    assert tok.tokenizer_config_dict["eos_token"] == "<|im_end|>"


def test_embedding_aliases(toks):
    tok = toks["bytelevel"]

    class FakeEmbedding:
        text_alias = "{{IMG}}"

        def get_ids(self):
            return torch.arange(1_000_000_000, 1_000_000_004)

    ids = tok.encode("see {{IMG}} here", embeddings=[FakeEmbedding()])[0].tolist()
    image = list(range(1_000_000_000, 1_000_000_004))
    expected = tok.encode("see ")[0].tolist() + image + tok.encode(" here")[0].tolist()
    assert ids == expected


def test_class_level_reset_pattern(dirs):
    """TabbyAPI assigns empty dicts on the class, then builds a tokenizer."""
    ExLlamaV2Tokenizer.unspecial_piece_to_id = {}
    ExLlamaV2Tokenizer.unspecial_id_to_piece = {}
    ExLlamaV2Tokenizer.extended_id_to_piece = {}
    ExLlamaV2Tokenizer.extended_piece_to_id = {}
    a = ExLlamaV2Tokenizer(make_config(dirs["bytelevel"]))
    b = ExLlamaV2Tokenizer(make_config(dirs["spm"]))
    assert "<|im_end|>" in a.extended_piece_to_id and "</s>" in b.extended_piece_to_id
    assert "</s>" not in a.extended_piece_to_id
    assert ExLlamaV2Tokenizer.extended_piece_to_id == {}  # instances never write the class dicts
    assert a.extended_id_to_piece == {i: p for p, i in a.extended_piece_to_id.items()}


# choosing the backend and errors -------------------------------------------------------------

def test_force_spm_and_force_json(tmp_path, dirs, caplog):
    both = write_bytelevel_bpe(tmp_path / "both")
    (both / "tokenizer.model").write_bytes((dirs["spm"] / "tokenizer.model").read_bytes())
    assert type(ExLlamaV2Tokenizer(make_config(both)).tokenizer_model).__name__ == "ExLlamaV2TokenizerHF"
    forced = ExLlamaV2Tokenizer(make_config(both), force_spm=True)
    assert type(forced.tokenizer_model).__name__ == "ExLlamaV2TokenizerSPM"
    # tokenizer.json's added tokens still count, mapped by us on top of sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(both / "tokenizer.model"))
    im_end = Tokenizer.from_file(str(both / "tokenizer.json")).token_to_id("<|im_end|>")
    assert forced.encode("hi<|im_end|>", encode_special_tokens=True)[0].tolist() == sp.encode("hi") + [im_end]

    with caplog.at_level(logging.WARNING, logger="exllamav2.tokenizer.tokenizer"):
        tok = ExLlamaV2Tokenizer(make_config(dirs["spm"]), force_json=True)
    assert type(tok.tokenizer_model).__name__ == "ExLlamaV2TokenizerSPM"
    assert "force_json" in caplog.text


def test_missing_files(tmp_path, dirs):
    with pytest.raises(FileNotFoundError) as err:
        ExLlamaV2Tokenizer(make_config(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="force_spm"):
        ExLlamaV2Tokenizer(make_config(dirs["bytelevel"]), force_spm=True)


def test_corpus_is_a_few_kb():
    assert 10_000 < sum(map(len, corpus())) < 1_000_000
