"""Vocabulary pieces to what a person reads: ' dog', not 'Ġdog' or '▁dog'.

Byte-level BPE (GPT-2, Llama 3, SmolLM2) spells each byte as a printable character; SentencePiece
(Llama 2, Gemma) writes spaces as '▁' and unknown bytes as '<0xNN>'. A token's bytes may be a partial
UTF-8 sequence, so the table keeps the raw bytes, and the display string shows undecodable bytes
escaped (`\xe2\x80`) rather than as '�', so that distinct tokens stay distinct.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

STYLES = ("bytelevel", "sentencepiece", "plain")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytelevel_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte → printable character map, inverted (character → byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _bytelevel_alphabet()
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _BYTE_OF.items()})  # each byte as the one Latin-1 character
_OUTSIDE_ALPHABET = re.compile(f"[^{re.escape(''.join(_BYTE_OF))}]")


def piece_bytes(piece: str, style: str) -> bytes:
    """The bytes a vocabulary piece stands for."""
    if style == "bytelevel":
        if not _OUTSIDE_ALPHABET.search(piece):  # nearly every piece: one translation, no loop in Python
            return piece.translate(_TO_LATIN1).encode("latin-1")
        return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode() for c in piece)
    if style == "sentencepiece":
        m = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(m[1], 16)]) if m else piece.replace("▁", " ").encode()
    return piece.encode()


@dataclass(frozen=True)
class TokenTable:
    """One entry per token id: the stored piece, the bytes it emits, a display string, specialness."""

    pieces: list[str]
    raw: list[bytes]
    text: list[str]
    special: list[bool]

    @classmethod
    def from_pieces(cls, pieces: list[str], style: str, special: set[int]) -> TokenTable:
        raw = [piece.encode() if i in special else piece_bytes(piece, style) for i, piece in enumerate(pieces)]
        text = [r.decode("utf-8", errors="backslashreplace") for r in raw]
        return cls(list(pieces), raw, text, [i in special for i in range(len(pieces))])

    def __len__(self) -> int:
        return len(self.pieces)

    def fit(self, n_rows: int) -> TokenTable:
        """Pad with `<unused:N>` entries for head rows the tokenizer never emits."""
        pad = [f"<unused:{i}>" for i in range(len(self), n_rows)]
        return TokenTable(self.pieces[:n_rows] + pad, self.raw[:n_rows] + [p.encode() for p in pad],
                          self.text[:n_rows] + pad, self.special[:n_rows] + [True] * len(pad))

    def is_word(self, i: int) -> bool:
        """A token that is a word or word piece: letters only, once the leading space is dropped."""
        return not self.special[i] and self.text[i].strip().isalpha()
