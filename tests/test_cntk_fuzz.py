"""The CNTK reader against hostile files: truncations, bit flips and crafted headers each fail
in one line (CntkFormatError / CntkImportError), quickly, without a large allocation."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from landcover.artifacts.cntk_graph import import_cntk_seed
from landcover.artifacts.cntk_proto import CntkFormatError, read_model_dictionary
from landcover.errors import LandcoverError
from tests.conftest import shared_dir
from tests.test_cntk import dictionary, field, ndarray, varint


def value(number: int, payload: bytes | int, wire: int = 2) -> bytes:
    """A DictionaryValue field (the same wire encoding as any field)."""
    return field(number, payload, wire)


def tiny_model() -> bytes:
    """A small, valid saved-function-like message: a type, a list, a nested dict, a tensor."""
    return dictionary(
        {
            "type": value(8, b"CompositeFunction"),
            "version": value(5, 1, 0),
            "primitive_functions": value(
                11, field(1, value(12, dictionary({"uid": value(8, b"p")})))
            ),
            "weights": value(13, ndarray((2, 3), np.arange(6, dtype=np.float32))),
        }
    )


def seeds() -> list[bytes]:
    files = [tiny_model()]
    shared = shared_dir()
    real = shared / "models" / "seed-cntk" / "1epoch.model" if shared else None
    if real is not None and real.is_file():
        files.append(real.read_bytes())
    return files


def fails_cleanly(tmp_path: Path, data: bytes, name: str = "crafted.model") -> None:
    path = tmp_path / name
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        import_cntk_seed(path)
    except LandcoverError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        pytest.fail(f"{len(data)} crafted bytes imported as a model")
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 100e6, (seconds, peak)


def test_the_tiny_model_decodes():
    decoded = read_model_dictionary_bytes(tiny_model())
    assert decoded["weights"].array.shape == (3, 2)
    assert decoded["primitive_functions"][0] == {"uid": "p"}


def read_model_dictionary_bytes(data: bytes):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".model") as handle:
        handle.write(data)
        handle.flush()
        return read_model_dictionary(Path(handle.name))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("huge length", field(2, b"")[:1] + varint(2**62)),
        ("length past the end", field(2, b"x" * 10)[:-5]),
        ("eight bytes", bytes([0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x00, 0x00])),
        ("deep nesting", b"".join([b""]) or None),
        ("huge shape", dictionary({"w": value(13, ndarray((2**31, 2**31, 2**31), np.zeros(0)))})),
        ("many dimensions", dictionary({"w": value(13, ndarray((1,) * 40, np.zeros(1)))})),
        ("NaN weights", dictionary({"w": value(13, ndarray((2,), np.array([1.0, np.nan])))})),
        ("wrong wire type", bytes([0x13, 0x00])),
        ("not a function", dictionary({"x": value(5, 1, 0)})),
        ("thirty bytes", tiny_model()[:30]),
    ],
)
def test_crafted_files_fail_in_one_line(tmp_path, name, data):
    if name == "deep nesting":  # a list in a list in a list ... 10,000 deep: 34 KB
        data = value(8, b"x")
        for _ in range(10_000):
            data = value(11, field(1, data))
        data = dictionary({"type": data})
    fails_cleanly(tmp_path, data)


def test_fuzzed_files_fail_cleanly_or_decode(tmp_path):
    """Truncations and bit flips of valid files: a clean error or a decoded dictionary; never
    another exception, a hang or a large allocation."""
    rng = np.random.default_rng(0)
    for index, seed in enumerate(seeds()):
        cases = [seed[: int(cut)] for cut in rng.integers(1, len(seed), 40)]
        for _ in range(60):
            flipped = bytearray(seed)
            for position in rng.integers(0, len(seed), 3):
                flipped[int(position)] ^= 1 << int(rng.integers(8))
            cases.append(bytes(flipped))
        for number, case in enumerate(cases):
            path = tmp_path / f"fuzz{index}_{number}.model"
            path.write_bytes(case)
            started = time.perf_counter()
            try:
                import_cntk_seed(path)
            except LandcoverError as err:
                assert "\n" not in str(err)
            assert time.perf_counter() - started < 5.0


def test_struct_floats_still_decode():
    assert struct.unpack("<f", struct.pack("<f", 1.5))[0] == 1.5
    with pytest.raises(CntkFormatError):
        read_model_dictionary_bytes(b"\x08")
