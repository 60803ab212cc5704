from __future__ import annotations

import math
import random

import msgpack
import pytest

from monitor_agent import wire


def test_keys_carry_the_run_id_as_a_hash_tag() -> None:
    keys = wire.Keys("cs:")
    assert keys.meta("a1b2") == "cs:run:{a1b2}:meta"
    assert keys.stream("a1b2", "scalars") == "cs:run:{a1b2}:scalars"
    assert keys.rollup("a1b2", 2) == "cs:run:{a1b2}:rollup:2"
    assert keys.run_state("a1b2", "latest") == "cs:run:{a1b2}:latest"
    assert keys.run_id_of(keys.run_state("a1b2", "rollup:state")) == "a1b2"
    assert keys.runs() == "cs:runs"
    assert keys.run_id_of(keys.stream("zz9", "events")) == "zz9"
    assert keys.run_id_of("cs:runs") is None
    with pytest.raises(ValueError, match="unknown stream kind"):
        keys.stream("a", "nope")


@pytest.mark.parametrize("run_id", ["a{b", "a}b", "a:b", "", "x" * 65, "a b"])
def test_unsafe_run_ids_are_rejected(run_id: str) -> None:
    assert not wire.valid_run_id(run_id)


def test_scalars_round_trip_with_random_values() -> None:
    rng = random.Random()
    values = {f"m{i}": rng.uniform(-1e6, 1e6) for i in range(20)}
    values["nan"] = math.nan
    rec = {"step": rng.randrange(10**9), "t": 1.5, "s": values}
    out = wire.decode("scalars", wire.encode("scalars", rec))
    assert out["step"] == rec["step"]
    assert out["v"] == wire.SCHEMA_VERSION
    assert math.isnan(out["s"].pop("nan"))
    values.pop("nan")
    assert out["s"] == values


def test_decode_rejects_garbage_and_unknown_versions() -> None:
    with pytest.raises(wire.MalformedRecord):
        wire.decode("scalars", {b"d": b"\xc1\xc1not msgpack"})
    with pytest.raises(wire.MalformedRecord):
        wire.decode("scalars", {b"x": b"1"})
    with pytest.raises(wire.MalformedRecord):
        wire.decode("scalars", {b"d": msgpack.packb([1, 2, 3])})
    future = msgpack.packb({"v": 999, "step": 1, "t": 0.0, "s": {}})
    with pytest.raises(wire.UnknownSchema):
        wire.decode("scalars", {b"d": future})
    bad_step = msgpack.packb({"v": wire.SCHEMA_VERSION, "step": "1", "t": 0.0, "s": {}})
    with pytest.raises(wire.MalformedRecord, match="step"):
        wire.decode("scalars", {b"d": bad_step})
    big = b"\x00" * (wire.MAX_RECORD_BYTES + 1)
    with pytest.raises(wire.OversizedRecord):
        wire.decode("scalars", {b"d": big})


def test_events_are_validated() -> None:
    rec = {"kind": "alert", "step": 3, "t": 0.0, "severity": "warning", "message": "m", "data": {}}
    assert wire.decode("events", wire.encode("events", rec))["kind"] == "alert"
    with pytest.raises(wire.MalformedRecord, match="event kind"):
        wire.encode("events", {**rec, "kind": "party"})


def test_meta_round_trip() -> None:
    meta = {"project": "p", "config": {"lr": 0.1, "layers": [1, 2]}, "layers": ["a", "b"]}
    out = wire.decode_meta({k.encode(): v.encode() for k, v in wire.encode_meta(meta).items()})
    assert out["config"] == meta["config"]
    assert out["layers"] == ["a", "b"]
    assert out["schema_version"] == str(wire.SCHEMA_VERSION)
    assert wire.decode_meta({b"config": b"{not json"})["config"] is None


def test_unchecked_encoding_is_the_same_bytes_and_kinds_are_still_checked() -> None:
    rng = random.Random()
    rec = {
        "step": rng.randrange(10**6),
        "t": rng.random(),
        "l": {"occupancy": [rng.random() for _ in range(rng.randrange(1, 9))]},
    }
    assert wire.encode("layers", rec, check=False) == wire.encode("layers", rec)
    # Unchecked records still decode through the server's checks, which catch a bad one.
    bad = wire.encode("layers", {**rec, "l": {"occupancy": "not a list"}}, check=False)
    with pytest.raises(wire.MalformedRecord, match="layer series"):
        wire.decode("layers", bad)
    with pytest.raises(wire.MalformedRecord, match="unknown record kind"):
        wire.encode("nope", rec, check=False)
