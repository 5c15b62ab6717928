"""A small pure-Python reader of R's serialization format (XDR, versions 2 and 3), enough to pull text
out of R data packages without R: ``.rda``/``.RData`` files, ``.rds`` files and lazy-load databases
(``Rdata.rdx`` + ``Rdata.rdb``, as installed R packages ship their data).

R values map to Python as: character vectors -> ``RVector`` (a list of str, None for NA); numeric,
integer and logical vectors -> ``RVector`` of float / int / bool (None for NA); lists -> ``RVector``
of items; pairlists -> ``RPairList`` (a list of (tag, value)). Attributes ride on ``.attrs`` (a dict),
so names are ``v.attrs.get("names")``. Environments, closures and byte code are read past but not
interpreted (``RObject``).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

NA_INT = -(2 ** 31)
# SEXP type codes (R's Rinternals.h) and the serialization pseudo-types (serialize.c)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP, SPECIALSXP, BUILTINSXP, CHARSXP = range(10)
LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 255, 254, 253, 252, 251, 250
NAMESPACESXP, PACKAGESXP, PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP = 249, 248, 247, 242, 241
ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 240, 239, 238


class RError(ValueError):
    """The bytes are not R serialization this reader understands."""


class RVector(list):
    """An R vector or list; ``attrs`` holds its attributes (names, class, ...)."""

    def __init__(self, items=(), rtype: int = VECSXP, attrs: dict | None = None):
        super().__init__(items)
        self.rtype, self.attrs = rtype, attrs or {}

    def named(self) -> dict:
        """{name: item} through the ``names`` attribute."""
        return dict(zip(self.attrs.get("names") or [], self))


class RPairList(list):
    """An R pairlist (or language object): a list of (tag or None, value)."""

    def __init__(self, items=(), rtype: int = LISTSXP, attrs: dict | None = None):
        super().__init__(items)
        self.rtype, self.attrs = rtype, attrs or {}


class RObject:
    """A value read past but not interpreted (environment, closure, byte code, external pointer)."""

    def __init__(self, rtype: int, attrs: dict | None = None, value=None):
        self.rtype, self.attrs, self.value = rtype, attrs or {}, value

    def __repr__(self):
        return f"RObject(type={self.rtype})"


class RSymbol(str):
    """An R symbol (its print name)."""


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos, self.refs = buf, pos, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise RError("truncated R serialization stream")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) + lo
        if n < 0:
            raise RError(f"negative vector length {n}")
        return n

    def header(self):
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RError(f"only XDR serialization is supported (format {fmt!r})")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RError(f"unsupported serialization version {version}")

    def _charsxp(self, levels: int):
        n = self.int()
        if n == -1:
            return None
        raw = self._take(n)
        enc = "latin-1" if levels & 4 else "utf-8"   # LATIN1_MASK; UTF8 and ASCII both decode as UTF-8
        return raw.decode(enc, errors="replace")

    def _attrs(self, has_attr: bool) -> dict:
        if not has_attr:
            return {}
        pl = self.item()
        return {str(t): v for t, v in pl} if isinstance(pl, RPairList) else {}

    def item(self):
        flags = self.int()
        t, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == NILVALUE_SXP:
            return None
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RObject(t)
        if t == REFSXP:
            i = flags >> 8
            if i == 0:
                i = self.int()
            if not 0 < i <= len(self.refs):
                raise RError(f"bad reference index {i}")
            return self.refs[i - 1]
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            if self.int() != 0:
                raise RError("bad string vector header")
            obj = RObject(t, value=[self.item() for _ in range(self.length())])
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t == ENVSXP:
            env = RObject(t)
            self.refs.append(env)
            self.int()  # locked
            enclos, frame, hashtab, attr = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab, "attr": attr}
            return env
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            out = RPairList(rtype=t)
            first = True
            while True:  # iterate the CDR chain instead of recursing (long pairlists)
                attrs = self._attrs(has_attr)
                if first:
                    out.attrs, first = attrs, False
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                nflags = self.int()
                nt = nflags & 0xFF
                if nt in (LISTSXP, ATTRLISTSXP) and t in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP):
                    has_attr, has_tag = bool(nflags & (1 << 9)), bool(nflags & (1 << 10))
                    continue
                self.pos -= 4
                tail = self.item()
                if tail is not None:
                    out.append((None, tail))
                return out
        if t == CHARSXP:
            return self._charsxp(levels)
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            conv = (lambda v: None if v == NA_INT else bool(v)) if t == LGLSXP else (lambda v: None if v == NA_INT else v)
            return RVector([conv(v) for v in vals], t, self._attrs(has_attr))
        if t == REALSXP:
            n = self.length()
            return RVector(struct.unpack(f">{n}d", self._take(8 * n)), t, self._attrs(has_attr))
        if t == CPLXSXP:
            n = self.length()
            v = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return RVector([complex(v[2 * i], v[2 * i + 1]) for i in range(n)], t, self._attrs(has_attr))
        if t == RAWSXP:
            n = self.length()
            return RVector(self._take(n), t, self._attrs(has_attr))
        if t in (STRSXP, VECSXP, EXPRSXP):
            n = self.length()
            items = [self.item() for _ in range(n)]
            return RVector(items, t, self._attrs(has_attr))
        if t == S4SXP:
            return RObject(t, self._attrs(has_attr))
        if t in (SPECIALSXP, BUILTINSXP):
            return RObject(t, value=self._take(self.int()).decode("latin-1"))
        if t == EXTPTRSXP:
            obj = RObject(t)
            self.refs.append(obj)
            obj.value = (self.item(), self.item())
            obj.attrs = self._attrs(has_attr)
            return obj
        if t == WEAKREFSXP:
            obj = RObject(t)
            self.refs.append(obj)
            obj.attrs = self._attrs(has_attr)
            return obj
        if t == ALTREP_SXP:
            info, state, attr = self.item(), self.item(), self.item()
            return self._altrep(info, state, attr)
        raise RError(f"unsupported R object type {t}")

    def _altrep(self, info, state, attr):
        cls = str(info[0][1]) if isinstance(info, RPairList) and info else ""
        attrs = {str(k): v for k, v in attr} if isinstance(attr, RPairList) else {}
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state[0], state[1], state[2]
            kind = INTSXP if cls == "compact_intseq" else REALSXP
            conv = int if kind == INTSXP else float
            return RVector([conv(start + i * step) for i in range(int(n))], kind, attrs)
        if cls.startswith("wrap_") and isinstance(state, RVector):
            v = state[0]
            if isinstance(v, RVector):
                v.attrs = {**v.attrs, **attrs}
            return v
        if cls == "deferred_string" and isinstance(state, RPairList):
            v = state[0][1]
            return RVector([None if x is None else (str(int(x)) if float(x).is_integer() else repr(x)) for x in v],
                           STRSXP, attrs)
        raise RError(f"unsupported ALTREP class {cls!r}")


def unserialize(data: bytes, pos: int = 0):
    """One R object from serialization bytes (``X\\n`` header first)."""
    r = _Reader(data, pos)
    r.header()
    return r.item()


def read_rds(path) -> object:
    """An ``.rds`` file (one serialized object, maybe gzip/bzip2/xz-compressed)."""
    return unserialize(_decompress(Path(path).read_bytes()))


def read_rda(path) -> dict:
    """An ``.rda`` / ``.RData`` file: {variable name: value}."""
    data = _decompress(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RError(f"{path}: not an R data file (magic {data[:5]!r})")
    pl = unserialize(data, 5)
    if not isinstance(pl, RPairList):
        raise RError(f"{path}: expected a pairlist of variables")
    return {str(tag): v for tag, v in pl}


def _lazyload_blob(blob: bytes) -> bytes:
    """One lazy-load record: a 4-byte big-endian length, then zlib data (R's compress = 1), or a type
    byte then data ('0' none, '1' zlib, '2' bzip2, 'Z' xz: compress = 2 / 3)."""
    if len(blob) < 5:
        raise RError("truncated lazy-load record")
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    try:
        if kind == b"Z":
            out = lzma.decompress(blob[5:])
        elif kind == b"2":
            out = bz2.decompress(blob[5:])
        elif kind == b"1":
            out = zlib.decompress(blob[5:])
        elif kind == b"0":
            out = blob[5:]
        else:
            out = zlib.decompress(blob[4:])
    except (zlib.error, lzma.LZMAError, OSError) as e:
        raise RError(f"bad lazy-load record: {e}") from None
    if len(out) != n:
        raise RError(f"lazy-load record length {len(out)} != declared {n}")
    return out


def read_lazyload(rdx_path) -> dict:
    """A lazy-load database (``X.rdx`` with ``X.rdb`` beside it): {variable name: value}."""
    rdx_path = Path(rdx_path)
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    index = read_rds(rdx_path)  # the index is a plain (gzip-compressed) .rds file
    if not isinstance(index, RVector):
        raise RError(f"{rdx_path}: not a lazy-load index")
    variables = index.named().get("variables")
    if not isinstance(variables, RVector):
        raise RError(f"{rdx_path}: index has no 'variables'")
    out = {}
    for name, (off, length) in variables.named().items():
        off, length = int(off), int(length)
        out[name] = unserialize(_lazyload_blob(rdb[off:off + length]))
    return out
