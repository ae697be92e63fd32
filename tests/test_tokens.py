"""Vocabulary pieces decode to what a person reads, and distinct partial-UTF-8 tokens stay distinct."""
from __future__ import annotations

from pipeline.tokens import TokenTable, piece_bytes


def test_bytelevel_pieces_decode_to_their_bytes():
    assert piece_bytes("Ġdog", "bytelevel") == b" dog"
    assert piece_bytes("Ċ", "bytelevel") == b"\n"
    assert piece_bytes("âĢ", "bytelevel") == b"\xe2\x80"  # the first two bytes of '—'
    # characters outside GPT-2's byte alphabet (a raw space, a soft hyphen, a CJK character) are their UTF-8
    assert piece_bytes("Ġa b\u00ad漢é", "bytelevel") == b" a b" + "\u00ad漢".encode() + b"\xe9"


def test_sentencepiece_pieces_decode_spaces_and_byte_tokens():
    assert piece_bytes("▁dog", "sentencepiece") == b" dog"
    assert piece_bytes("<0x0A>", "sentencepiece") == b"\n"
    assert piece_bytes("dog", "sentencepiece") == b"dog"


def test_table_keeps_specials_verbatim_and_escapes_partial_utf8():
    table = TokenTable.from_pieces(["<|endoftext|>", "Ġdog", "âĢ", "âĤ"], "bytelevel", special={0})
    assert table.text == ["<|endoftext|>", " dog", "\\xe2\\x80", "\\xe2\\x82"]
    assert table.raw[2] == b"\xe2\x80"
    assert [table.is_word(i) for i in range(4)] == [False, True, False, False]


def test_fit_pads_rows_the_tokenizer_never_emits():
    table = TokenTable.from_pieces(["a", "b"], "plain", special=set()).fit(4)
    assert table.text == ["a", "b", "<unused:2>", "<unused:3>"]
    assert table.special == [False, False, True, True]
