"""tools/rdata.py (R serialization reader) on bytes written here by a small XDR writer, and
tools/fetch_domains.py on the real Debian packages (skipped where they cannot be fetched)."""
import gzip
import random
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fetch_domains
import rdata

HDR3 = b"X\n" + struct.pack(">iii", 3, 0x40300, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
HDR2 = b"X\n" + struct.pack(">iii", 2, 0x30602, 0x20300)


def _flags(t, attr=False, tag=False, levels=0):
    return struct.pack(">i", t | (attr << 9) | (tag << 10) | (levels << 12))


def _char(s):
    if s is None:
        return _flags(9) + struct.pack(">i", -1)
    b = s.encode()
    return _flags(9, levels=8) + struct.pack(">i", len(b)) + b


def _sym_first(name):
    return _flags(1) + _char(name)


def _strvec(items, attrs=b""):
    return _flags(16, attr=bool(attrs)) + struct.pack(">i", len(items)) + b"".join(map(_char, items)) + attrs


def _intvec(items):
    return _flags(13) + struct.pack(">i", len(items)) + b"".join(
        struct.pack(">i", rdata.NA_INT if v is None else v) for v in items)


def _realvec(items):
    return _flags(14) + struct.pack(">i", len(items)) + struct.pack(f">{len(items)}d", *items)


def _pairlist(entries):
    """entries: [(tag_bytes, value_bytes)]; tag bytes are a written symbol (first use or REFSXP)."""
    out = b""
    for tag, val in entries:
        out += _flags(2, tag=True) + tag + val
    return out + _flags(254)


def _ref(i):
    return struct.pack(">i", 255 | (i << 8))


def test_vectors_names_na_and_symbol_refs():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdé xyz") for _ in range(rng.randint(0, 12))) for _ in range(50)]
    words[7] = None
    ints = [rng.randint(-1000, 1000) for _ in range(30)] + [None]
    reals = [rng.uniform(-1, 1) for _ in range(9)]
    # list(a = <chr>, b = <int>, c = <dbl>) with a names attribute; the symbol 'names' written once
    names_attr = _pairlist([(_sym_first("names"), _strvec(["a", "b", "c"]))])
    lst = _flags(19, attr=True) + struct.pack(">i", 3) + _strvec(words) + _intvec(ints) + _realvec(reals) + names_attr
    for hdr in (HDR2, HDR3):
        v = rdata.unserialize(hdr + lst)
        assert v.named()["a"] == words and v.named()["b"] == ints
        assert v.named()["c"] == pytest.approx(reals, abs=0)
    # a pairlist whose second tag is a reference to the first symbol
    pl = _pairlist([(_sym_first("x"), _strvec(["1"])), (_ref(1), _strvec(["2"]))])
    got = rdata.unserialize(HDR3 + pl)
    assert [(str(t), v) for t, v in got] == [("x", ["1"]), ("x", ["2"])]


def test_read_rda_and_lazyload(tmp_path):
    rng = random.Random(1)
    novel = [" ".join(rng.choice(["the", "a", "Emma", "said", ""]) for _ in range(8)) for _ in range(200)]
    other = [f"line {i}" for i in range(17)]
    rda = tmp_path / "x.rda"
    rda.write_bytes(gzip.compress(b"RDX3\n" + HDR3 + _pairlist([(_sym_first("novel"), _strvec(novel)),
                                                                 (_sym_first("other"), _strvec(other))])))
    assert rdata.read_rda(rda) == {"novel": novel, "other": other}
    # lazy-load db: records are 4-byte length + zlib; the .rdx index is a gzip'd .rds
    recs, offsets = b"", []
    for val in (novel, other):
        raw = HDR3 + _strvec(val)
        rec = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append((len(recs), len(rec)))
        recs += rec
    (tmp_path / "Rdata.rdb").write_bytes(recs)
    vars_ = _flags(19, attr=True) + struct.pack(">i", 2) + b"".join(_intvec(list(o)) for o in offsets) + \
        _pairlist([(_sym_first("names"), _strvec(["novel", "other"]))])
    index = _flags(19, attr=True) + struct.pack(">i", 1) + vars_ + _pairlist([(_ref(1), _strvec(["variables"]))])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(HDR3 + index))
    assert rdata.read_lazyload(tmp_path / "Rdata.rdx") == {"novel": novel, "other": other}


def test_bad_input_raises_rerror(tmp_path):
    with pytest.raises(rdata.RError):
        rdata.unserialize(b"A\n" + b"\0" * 20)          # ASCII format: not supported
    with pytest.raises(rdata.RError):
        rdata.unserialize(HDR3 + _strvec(["abc"])[:-2])  # truncated
    bad = tmp_path / "bad.rda"
    bad.write_bytes(b"not R data")
    with pytest.raises(rdata.RError):
        rdata.read_rda(bad)


def test_austen_chunks_round_robin_from_chapter_one():
    novels = {"b": ["TITLE", "Chapter 1", "Bee one", "two.", "", "Bee para", "", "x" * 50],
              "a": ["A BOOK", "by Someone", "CHAPTER I", "Aye first", "", "Aye second"]}
    docs = fetch_domains.austen_docs(novels, chunk_chars=10, per_novel=2)
    assert docs == ["Aye first", "Bee one two.", "Aye second", "Bee para"]


def test_reuters_article_joins_wraps_and_drops_signoff():
    xml = ('<REUTERS><TEXT><TITLE>OIL CUT</TITLE><BODY>Oil fell\ntoday.\n    Prices\n'
           'rose later.\n Reuter</BODY></TEXT></REUTERS>')
    assert fetch_domains.reuters_article(xml) == "Oil cut\n\nOil fell today.\n\nPrices rose later."
    assert fetch_domains.reuters_article("<REUTERS><TEXT><TITLE>x</TITLE></TEXT></REUTERS>") is None


def test_fetch_cli_rejects_unknown_domain(capsys):
    assert fetch_domains.main(["--domains", "nope"]) == 2
    assert "unknown domain" in capsys.readouterr().err


@pytest.mark.parametrize("name,min_docs,words", [("austen", 18, ("Emma", "Elinor", "Elizabeth")),
                                                  ("reuters", 60, ("oil", "shares", "dlrs"))])
def test_fetch_real_domain(tmp_path, monkeypatch, name, min_docs, words):
    monkeypatch.setenv("GIFT_QUANT_DOMAINS", str(tmp_path))
    try:
        docs = fetch_domains.fetch(name)
    except fetch_domains.DomainError as e:
        pytest.skip(f"{name} cannot be fetched here: {e}")
    assert len(docs) >= min_docs and all(isinstance(d, str) and d for d in docs)
    text = " ".join(docs)
    assert all(w in text for w in words)
    assert sum(len(d) for d in docs) > 50_000
    # running prose: mostly long sentences, not a word list
    assert sum(len(d.split()) for d in docs) / sum(d.count(".") + 1 for d in docs) > 8
    assert (tmp_path / f"{name}.json").exists() and fetch_domains.fetch(name) == docs  # cached


def test_geomean():
    assert fetch_domains.geomean([2.0, 8.0]) == pytest.approx(4.0)
