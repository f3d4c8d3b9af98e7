"""Checking that a sequential (baseline) JPEG's compressed data is whole, before trusting a decode.

libjpeg decodes a JPEG damaged in its middle without an error: it *warns* ("Corrupt JPEG data:
premature end of data segment", "N extraneous bytes before marker", "bad Huffman code"), fills
what it could not decode, and returns an image of garbage. Pillow drops those warnings, so
:func:`check_jpeg` repeats libjpeg's bookkeeping: it walks the markers, Huffman-decodes every
scan's entropy-coded data (symbols only: no dequantisation, no IDCT) and checks that each restart
interval holds exactly the MCUs the frame header promises, every code is in its table, no block
has more than 64 coefficients, restart markers come in order and no bytes are left over.

Every JPEG is then decoded once more by libjpeg-turbo with its warnings made errors
(``simplejpeg.decode_jpeg(strict=True)``): that is the check of progressive JPEGs, which the walk
above does not cover. Neither replaces the other (``benchmarks/jpeg_strict.py``, on the same
damaged files): of sequential JPEGs with zeroed bytes the walk refuses every one and strict
decoding 10-19 of 24 (letting through images 22-28 of 255 off on average); of progressive ones
the walk refuses none and strict decoding 18-23 of 24 (letting through images at most 0.5 off).
Cost: the walk is one pass over the compressed data, O(bytes), in pure Python (an order of
magnitude slower than Pillow's decode in C); the strict decode is one more decode in C.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEQUENTIAL_HUFFMAN = {0xC0, 0xC1}  # SOF0 baseline, SOF1 extended sequential
OTHER_FRAMES = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_INVALID = (0, 0)  # (symbol, length 0): a code that is in no table


class JpegDataError(ValueError):
    """The compressed data is damaged; ``truncated`` when it simply ends early."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


@dataclass
class _Component:
    id: int
    h: int
    v: int
    tq: int = 0
    dc: int = 0
    ac: int = 0


@dataclass
class _Frame:
    width: int
    height: int
    precision: int = 8
    components: dict[int, _Component] = field(default_factory=dict)

    @property
    def hmax(self) -> int:
        return max(c.h for c in self.components.values())

    @property
    def vmax(self) -> int:
        return max(c.v for c in self.components.values())


def _lookup(counts: bytes, symbols: bytes) -> list[tuple[int, int]]:
    """A 16-bit-prefix table: entry ``w`` is (symbol, code length) of the code starting ``w``."""
    table = [_INVALID] * 65536
    code, k = 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if code >= 1 << length:
                raise JpegDataError("invalid Huffman table (too many codes)")
            span = 1 << (16 - length)
            table[code * span:(code + 1) * span] = [(symbols[k], length)] * span
            code, k = code + 1, k + 1
        code <<= 1
    return table


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _unstuff(data: bytes) -> bytes:
    return data.replace(b"\xff\x00", b"\xff")


def _decode_interval(data: bytes, mcus: int, plan: list[tuple]) -> None:
    """Huffman-decode ``mcus`` MCUs from one restart interval's (unstuffed) bytes.

    ``plan``: per block of an MCU, (DC table, AC table, component index in the scan, largest
    quantised DC value an 8x8 block of valid samples can have). Raises JpegDataError when a code
    is in no table, a block overflows 64 coefficients or its DC value leaves the sample range,
    the data runs out, or whole bytes are left over."""
    buf = data + b"\x00\x00\x00\x00"
    nbits = 8 * len(data)
    try:
        pos = _decode_mcus(buf, nbits, mcus, plan)
    except IndexError:  # ran past the padding inside an MCU
        pos = len(buf) * 8
    if pos > nbits:
        raise JpegDataError("the compressed data ends before the image does "
                            "(premature end of data segment)")
    if nbits - pos >= 8:
        raise JpegDataError(f"{(nbits - pos) // 8} extraneous bytes after the image data")


def _decode_mcus(buf: bytes, nbits: int, mcus: int, plan: list[tuple]) -> int:
    """The bit position after ``mcus`` MCUs (stops early, past ``nbits``, when data runs out)."""
    pos = 0
    pred = [0] * (1 + max(p[2] for p in plan))  # DC predictor per component
    for _ in range(mcus):
        for dc, ac, comp, limit in plan:
            b = pos >> 3
            sym, length = dc[(((buf[b] << 16) | (buf[b + 1] << 8) | buf[b + 2]) >> (8 - (pos & 7))) & 0xFFFF]
            if not length:
                raise JpegDataError(f"bad Huffman code at byte {b}")
            pos += length
            if sym:  # the DC difference: sym bits, read as JPEG's signed "extend"
                b = pos >> 3
                word = (buf[b] << 24) | (buf[b + 1] << 16) | (buf[b + 2] << 8) | buf[b + 3]
                diff = (word >> (32 - sym - (pos & 7))) & ((1 << sym) - 1)
                if diff < 1 << (sym - 1):
                    diff -= (1 << sym) - 1
                pred[comp] += diff
                pos += sym
                if abs(pred[comp]) > limit:
                    raise JpegDataError(f"a DC coefficient outside the sample range at byte {b}")
            k = 1
            while k < 64:
                b = pos >> 3
                rs, length = ac[(((buf[b] << 16) | (buf[b + 1] << 8) | buf[b + 2]) >> (8 - (pos & 7))) & 0xFFFF]
                if not length:
                    raise JpegDataError(f"bad Huffman code at byte {b}")
                pos += length + (rs & 15)
                if rs & 15:
                    k += (rs >> 4) + 1
                elif rs == 0xF0:
                    k += 16
                else:
                    break  # end of block
            if k > 64:
                raise JpegDataError(f"a block with more than 64 coefficients at byte {b}")
        if pos > nbits:
            return pos
    return pos


def _scan(data: bytes, start: int, frame: _Frame, header: bytes, dc_tables: dict, ac_tables: dict,
          restart: int, dc_quant: dict[int, int]) -> int:
    """Check one scan starting at ``start`` (just after its SOS header); returns the offset of
    the marker that ends it. ``dc_quant``: quantisation table -> its DC step."""

    def dc_limit(c: _Component) -> int:
        # level-shifted samples in [-2^(P-1), 2^(P-1)) give |DC| <= 8 * 2^(P-1); one step of slack
        step = dc_quant.get(c.tq, 1) or 1
        return (8 << (frame.precision - 1)) // step + 2

    ns = header[0]
    comps = []
    for i in range(ns):
        cid, tables = header[1 + 2 * i], header[2 + 2 * i]
        if cid not in frame.components:
            raise JpegDataError(f"scan names component {cid}, which the frame does not have")
        comp = frame.components[cid]
        comp.dc, comp.ac = tables >> 4, tables & 15
        if comp.dc not in dc_tables or comp.ac not in ac_tables:
            raise JpegDataError("scan uses a Huffman table that was never defined")
        comps.append(comp)
    hmax, vmax = frame.hmax, frame.vmax
    if ns == 1:  # non-interleaved: one block per MCU, over the component's own size
        c = comps[0]
        cols = _ceil(_ceil(frame.width * c.h, hmax), 8)
        rows = _ceil(_ceil(frame.height * c.v, vmax), 8)
        plan = [(dc_tables[c.dc], ac_tables[c.ac], 0, dc_limit(c))]
    else:
        cols, rows = _ceil(frame.width, 8 * hmax), _ceil(frame.height, 8 * vmax)
        plan = [(dc_tables[c.dc], ac_tables[c.ac], i, dc_limit(c))
                for i, c in enumerate(comps) for _ in range(c.h * c.v)]
    total = cols * rows
    intervals, pos, expect = [], start, 0
    seg = start
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            raise JpegDataError("the file ends inside the image data", truncated=True)
        nxt = data[pos + 1]
        if nxt == 0x00 or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        if 0xD0 <= nxt <= 0xD7:
            if nxt - 0xD0 != expect:
                raise JpegDataError(f"restart marker RST{nxt - 0xD0} where RST{expect} belongs")
            expect = (expect + 1) % 8
            intervals.append(data[seg:pos])
            pos = seg = pos + 2
            continue
        intervals.append(data[seg:pos])
        break
    per = restart if restart else total
    wanted = _ceil(total, per)
    if len(intervals) != wanted:
        raise JpegDataError(f"{len(intervals)} restart intervals where the frame needs {wanted}")
    for i, chunk in enumerate(intervals):
        _decode_interval(_unstuff(chunk), min(per, total - i * per), plan)
    return pos


def check_jpeg(data: bytes) -> None:
    """Raise :class:`JpegDataError` when a JPEG's compressed data is damaged or cut short: the
    walk of sequential Huffman JPEGs, then libjpeg-turbo's strict decode of every JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return
    _walk(data)
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, strict=True)
    except ValueError as err:
        # ("premature end of data segment" is libjpeg's word for damage inside a segment too;
        # a file cut short is refused as truncated by the decode before this)
        raise JpegDataError(f"libjpeg-turbo: {err}") from None


def _walk(data: bytes) -> None:
    """The marker and entropy-coded data walk (the module doc); returns early for kinds it does
    not cover (progressive, lossless, arithmetic-coded, a DNL height)."""
    pos, frame, restart = 2, None, 0
    dc_tables: dict[int, list] = {}
    ac_tables: dict[int, list] = {}
    dc_quant: dict[int, int] = {}
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < len(data) - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos < 0 or pos + 1 >= len(data):
            raise JpegDataError("the file ends before its end-of-image marker", truncated=True)
        marker = data[pos + 1]
        if marker == 0xD9:
            return
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
            continue
        if pos + 4 > len(data):
            raise JpegDataError("the file ends inside a marker segment", truncated=True)
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body = data[pos + 4:pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            raise JpegDataError(f"marker 0xFF{marker:02X} has a bad length", truncated=len(body) < length - 2)
        if marker in OTHER_FRAMES:
            return  # progressive / lossless / arithmetic: not checked here
        if marker in SEQUENTIAL_HUFFMAN:
            height, width, n = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            if height == 0 or width == 0:
                return  # height defined later by a DNL marker: not checked here
            frame = _Frame(width, height, body[0])
            for i in range(n):
                cid, hv, tq = body[6 + 3 * i], body[7 + 3 * i], body[8 + 3 * i]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4):
                    raise JpegDataError(f"component {cid} has invalid sampling factors")
                frame.components[cid] = _Component(cid, hv >> 4, hv & 15, tq)
        elif marker == 0xDB:
            at = 0
            while at + 3 <= len(body):
                wide = body[at] >> 4  # 16-bit entries
                dc_quant[body[at] & 15] = int.from_bytes(body[at + 1:at + 2 + wide], "big")
                at += 1 + 64 * (1 + wide)
        elif marker == 0xC4:
            at = 0
            while at < len(body):
                kind, counts = body[at], body[at + 1:at + 17]
                symbols = body[at + 17:at + 17 + sum(counts)]
                (dc_tables if kind >> 4 == 0 else ac_tables)[kind & 15] = _lookup(counts, symbols)
                at += 17 + sum(counts)
        elif marker == 0xDD:
            restart = int.from_bytes(body[0:2], "big")
        elif marker == 0xDA:
            if frame is None:
                raise JpegDataError("image data before the frame header")
            pos = _scan(data, pos + 2 + length, frame, body, dc_tables, ac_tables, restart, dc_quant)
            continue
        pos += 2 + length
