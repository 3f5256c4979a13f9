"""cogalign.inputs.records: streaming reader, counting, record checks."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cogalign.inputs.records as records
from cogalign.errors import InputError, RecordError
from cogalign.inputs.records import REJECT_REASONS, RecordCheck, check_record, count_records, detect_format, iter_records

from corpus import make_bad_corpus


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def write_json(path: Path, values: list, **kw) -> Path:
    return write(path, json.dumps(values, **kw))


def write_jsonl(path: Path, values: list, **kw) -> Path:
    return write(path, "".join(json.dumps(v, **kw) + "\n" for v in values))


def same(a, b) -> bool:
    """Equal values *and* types (int stays int, float stays float), recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def sample_records(n: int = 50) -> list:
    out = []
    for i in range(n):
        out.append({
            "id": f"{i:06d}" if i % 3 else i,
            "image": f"coco/train2017/{i:012d}.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is this? ünïcödé 日本語 😀 \u2028 \"q\" \\ {i}"},
                {"from": "gpt", "value": "A cat.\nOn a mat.\t\u0000end"},
            ],
            "meta": {"nested": [1, -2, 3.5, -0.0, 1e300, 5e-324, 2**70, -(2**63), True, False, None, {"deep": [[[]]]}],
                     "score": i / 7, "whole_float": 3.0, "int": i},
            "": "empty key",
        })
    out.append([1, 2, 3])  # non-object records are yielded too; check_record rejects them
    out.append("a string record")
    out.append(None)
    return out


# ---------------------------------------------------------------- detect_format

@pytest.mark.parametrize("text, fmt", [
    ("[]", "json"), ("  \n\t[{}]", "json"), ("\ufeff[1]", "json"),
    ('{"a": 1}\n', "jsonl"), ('\n\n  {"a": 1}', "jsonl"), ('\ufeff{"a": 1}\n', "jsonl"),
    ("{ }\n", "jsonl"), ('{"a":\n', "jsonl"),
])
def test_detect_format(tmp_path, text, fmt):
    assert detect_format(write(tmp_path / "f", text)) == fmt


@pytest.mark.parametrize("text, needle", [
    ('"str"', "neither"), ("x", "neither"),
    ("\x00", "neither"), ('{\n  "id": 1\n}\n', "pretty-printed"),
])
def test_detect_format_rejects(tmp_path, text, needle):
    path = write(tmp_path / "f.json", text)
    with pytest.raises(InputError) as info:
        detect_format(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_detect_format_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "nope.json")
    with pytest.raises(InputError, match="directory"):
        detect_format(tmp_path)
    with pytest.raises(InputError):
        list(iter_records(tmp_path / "nope.json"))
    with pytest.raises(InputError):
        count_records(tmp_path / "nope.json")


# ------------------------------------------------------------------ iter_records

@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_streams_like_json_load(tmp_path, indent):
    values = sample_records()
    for ensure_ascii in (True, False):
        path = write_json(tmp_path / "a.json", values, indent=indent, ensure_ascii=ensure_ascii)
        with open(path, encoding="utf-8") as f:
            reference = json.load(f)
        got = list(iter_records(path))
        assert [i for i, _ in got] == list(range(len(reference)))
        assert same([r for _, r in got], reference)
        assert count_records(path) == len(reference)


def test_jsonl_streams_like_json_loads(tmp_path):
    values = sample_records()
    for ensure_ascii in (True, False):
        path = write_jsonl(tmp_path / "a.jsonl", values, ensure_ascii=ensure_ascii)
        reference = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        got = list(iter_records(path))
        assert [i for i, _ in got] == list(range(len(reference)))
        assert same([r for _, r in got], reference)
        assert count_records(path) == len(reference)


def test_json_array_uses_ijson_not_json_load(tmp_path, monkeypatch):
    path = write_json(tmp_path / "a.json", sample_records(5))

    def forbidden(*a, **k):
        raise AssertionError("json.load of the whole file")

    monkeypatch.setattr(json, "load", forbidden)
    monkeypatch.setattr(json, "loads", forbidden)
    assert len(list(iter_records(path))) == 8


@pytest.mark.parametrize("late", [0, 5])
def test_numbers_beyond_64_bits_match_json_load(tmp_path, late):
    text = "[" + '{"a": 1}, ' * late + '{"big": 1180591620717411303424, "neg": -9223372036854775808, "u64": 18446744073709551616, "f": 1.5}, {"b": 2}]'
    path = write(tmp_path / "a.json", text)
    reference = json.loads(text)
    got = list(iter_records(path))
    assert same([r for _, r in got], reference) and [i for i, _ in got] == list(range(late + 2))
    assert list(iter_records(path, skip=lambda i: i != late + 1)) == [(late + 1, {"b": 2})]
    assert count_records(path) == late + 2
    line = '{"big": 1180591620717411303424, "u64": 18446744073709551616, "s": "12345678901234567890123", "f": 0.1234567890123456789012}'
    path = write(tmp_path / "a.jsonl", line + "\n" + '{"small": 18446744073709551615}\n')
    got = [r for _, r in iter_records(path)]
    assert same(got, [json.loads(line), {"small": 18446744073709551615}])


def test_double_overflow_and_non_json_numbers_are_invalid(tmp_path):
    with pytest.raises(InputError, match="after record 0"):
        list(iter_records(write(tmp_path / "a.json", '[{"a": 1}, {"inf": 1e400}]')))
    path = write(tmp_path / "a.jsonl", '{"inf": 1e400}\n{"nan": NaN}\n{"s": "\\ud800"}\n{"ok": 1}\n')
    got = list(iter_records(path))
    assert [r.reason for _, r in got[:3]] == ["invalid_json"] * 3 and got[3] == (3, {"ok": 1})


def test_bom_is_skipped(tmp_path):
    recs = [{"id": "é"}, {"id": 2}]
    a = write(tmp_path / "a.json", b"\xef\xbb\xbf" + json.dumps(recs).encode())
    b = write(tmp_path / "b.jsonl", b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in recs))
    for path in (a, b):
        assert [r for _, r in iter_records(path)] == recs
        assert count_records(path) == 2


def test_jsonl_blank_lines_crlf_and_no_final_newline(tmp_path):
    path = write(tmp_path / "a.jsonl", b'\n  \n{"a": 1}\r\n\r\n\t \n{"a": 2}\n\n{"a": 3}')
    assert list(iter_records(path)) == [(0, {"a": 1}), (1, {"a": 2}), (2, {"a": 3})]
    assert count_records(path) == 3


def test_jsonl_invalid_line_is_a_record_error_at_its_position(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"a": 1}\n\n{"a": \nnot json\n{"a": 2}\n{"a": 3,}\n[1]\n{"a": "\u00e9"}')
    got = list(iter_records(path))
    assert [i for i, _ in got] == [0, 1, 2, 3, 4, 5, 6]
    assert got[0][1] == {"a": 1} and got[3][1] == {"a": 2} and got[5][1] == [1] and got[6][1] == {"a": "é"}
    for index, line in ((1, 3), (2, 4), (4, 6)):
        err = got[index][1]
        assert isinstance(err, RecordError) and err.reason == "invalid_json"
        assert err.detail.startswith(f"line {line}: ") and "\n" not in err.detail
    assert count_records(path) == 7


def test_jsonl_invalid_utf8_and_nul_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", b'{"a": "\xff"}\n\x00\n{"ok": true}\n')
    got = list(iter_records(path))
    assert [type(r).__name__ for _, r in got] == ["RecordError", "RecordError", "dict"]
    assert count_records(path) == 3


def test_jsonl_unicode_line_separators_do_not_split(tmp_path):
    recs = [{"v": "a\u2028b\u2029c\x85d\x0ce"}, {"v": 2}]
    path = write_jsonl(tmp_path / "a.jsonl", recs, ensure_ascii=False)
    assert [r for _, r in iter_records(path)] == recs
    assert count_records(path) == 2


def test_skip_keeps_positions_json(tmp_path):
    values = sample_records(20)
    path = write_json(tmp_path / "a.json", values)
    everything = list(iter_records(path))
    seen = []
    got = list(iter_records(path, skip=lambda i: seen.append(i) or i % 3 != 0))
    assert seen == list(range(len(values)))
    assert got == [(i, r) for i, r in everything if i % 3 == 0]


def test_skip_keeps_positions_jsonl_and_does_not_parse(tmp_path, monkeypatch):
    lines = ['{"a": 0}', "not json", "", '{"a": 2}', "also not json", '{"a": 4}']
    path = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    # positions: 0 -> a0, 1 -> bad, 2 -> a2, 3 -> bad, 4 -> a4
    assert [i for i, _ in iter_records(path)] == [0, 1, 2, 3, 4]
    calls = []
    real = records.orjson.loads
    monkeypatch.setattr(records.orjson, "loads", lambda b: calls.append(b) or real(b))
    got = list(iter_records(path, skip=lambda i: i % 2 == 1))
    assert got == [(0, {"a": 0}), (2, {"a": 2}), (4, {"a": 4})]
    assert len(calls) == 3  # the skipped (invalid) lines were never parsed


def test_malformed_array_raises_after_good_records(tmp_path):
    path = write(tmp_path / "a.json", '[{"a": 0}, {"a": 1}, {"a": 2, ]')
    got = []
    with pytest.raises(InputError) as info:
        for item in iter_records(path):
            got.append(item)
    assert got == [(0, {"a": 0}), (1, {"a": 1})]
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid JSON after record 1: ") and "\n" not in msg
    assert "repair the file" in msg and "JSONL" in msg  # and how to go on
    with pytest.raises(InputError, match="after record 1"):
        count_records(path)


@pytest.mark.parametrize("text, where", [
    ('[{"a": 0}, {"a": 1}', "after record 1"),  # truncated
    ('[{"a": 0}] trailing', "after record 0"),  # garbage after the array
    ('[{"a": 0}, ]', "after record 0"),
    ('[{"a": "\xff"}]', "before the first record"),
    ("[", "before the first record"),
    ('[{"a": NaN}]', "before the first record"),
])
def test_malformed_array_variants(tmp_path, text, where):
    path = write(tmp_path / "a.json", text.encode("latin-1"))
    with pytest.raises(InputError, match=where):
        list(iter_records(path))
    with pytest.raises(InputError, match=where):
        count_records(path)


@pytest.mark.parametrize("text", ["", "  \n\t ", "\ufeff", "\n\n"])
def test_empty_file_is_jsonl_without_records(tmp_path, text):
    path = write(tmp_path / "f.jsonl", text)
    assert detect_format(path) == "jsonl"
    assert list(iter_records(path)) == [] and count_records(path) == 0


def test_count_records_hashes_every_byte(tmp_path):
    import hashlib

    for name, text in [("a.json", '\ufeff[{"a": 1}, {"b": 2}]  \n\n'), ("b.jsonl", '{"a": 1}\n\n{"b": 2}'),
                       ("c.json", '[{"big": 123456789012345678901234567890}, {"x": 1}]')]:
        path = write(tmp_path / name, text)
        digest = hashlib.sha256()
        assert count_records(path, digest) == 2
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest(), name


def test_empty_array(tmp_path):
    path = write(tmp_path / "a.json", " [ ] \n")
    assert list(iter_records(path)) == [] and count_records(path) == 0


# hypothesis: arbitrary JSON round-trips --------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(json_values, max_size=6), ensure_ascii=st.booleans())
def test_roundtrip_arbitrary_json(tmp_path, values, ensure_ascii):
    a = write_json(tmp_path / "h.json", values, ensure_ascii=ensure_ascii)
    assert same([r for _, r in iter_records(a)], json.loads(a.read_text(encoding="utf-8")))
    assert count_records(a) == len(values)
    # JSONL can only start with an object: wrap each value
    wrapped = [{"v": v} for v in values]
    if wrapped:
        b = write_jsonl(tmp_path / "h.jsonl", wrapped, ensure_ascii=ensure_ascii)
        assert same([r for _, r in iter_records(b)], wrapped)
        assert count_records(b) == len(wrapped)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.sampled_from(['{"a": 1}', "", "   ", "\t", "bad", '{"b": [1, 2]}', "\r", '{"c": "x y"}  ']), min_size=1, max_size=30),
    chunk=st.integers(1, 12),
    final_newline=st.booleans(),
)
def test_count_jsonl_matches_iter_at_any_chunk_size(tmp_path, monkeypatch, lines, chunk, final_newline):
    lines = ['{"first": 0}'] + lines
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + ("\n" if final_newline else ""))
    monkeypatch.setattr(records, "_CHUNK", chunk)
    assert count_records(path) == len(list(iter_records(path))) == sum(1 for l in lines if l.strip(" \t\r"))


# ------------------------------------------------------------------ check_record

def conv(*roles, value="x"):
    return [{"from": r, "value": value} for r in roles]


GOOD = conv("human", "gpt")


REJECT_CASES = [
    ([], "not_an_object", "list"),
    ("s", "not_an_object", "string"),
    (1, "not_an_object", "number"),
    (None, "not_an_object", "null"),
    (True, "not_an_object", "boolean"),
    ({"image": "a.jpg"}, "conversations_missing", "conversations"),
    ({"messages": []}, "conversations_missing", "messages"),
    ({"conversations": None}, "conversations_not_list", "null"),
    ({"conversations": {"from": "human"}}, "conversations_not_list", "object"),
    ({"conversations": "human: hi"}, "conversations_not_list", "string"),
    ({"conversations": []}, "conversations_empty", "empty"),
    ({"conversations": ["hi", "there"]}, "turn_not_object", "turn 0"),
    ({"conversations": GOOD + [None, None]}, "turn_not_object", "turn 2"),
    ({"conversations": conv("human", "assistant")}, "turn_bad_role", "turn 1 is from 'assistant'"),
    ({"conversations": conv("user", "gpt")}, "turn_bad_role", "turn 0 is from 'user'"),
    ({"conversations": conv("Human", "gpt")}, "turn_bad_role", "'Human'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": None, "value": "y"}]}, "turn_bad_role", "turn 1 is from None"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": ["gpt"], "value": "y"}]}, "turn_bad_role", "a list"),
    ({"conversations": [{"from": "human", "value": "x"}, {"value": "y"}]}, "turn_bad_role", "turn 1 has no `from`"),
    ({"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "turn_bad_role",
     "turn 0 is a {role, content} turn with role 'user'; cogalign converts only the roles"),
    ({"conversations": GOOD + conv("system", "gpt")}, "turn_bad_role", "turn 2 is from 'system'"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "y"}]}, "turn_value_not_string", "turn 0"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}, "turn_value_not_string", "turn 1"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ["y"]}]}, "turn_value_not_string", "turn 1"),
    ({"conversations": conv("system", "human", "gpt")}, "leading_system_turn", "system"),
    ({"conversations": conv("gpt", "human")}, "roles_not_alternating", "turn 0"),
    ({"conversations": conv("human", "human", "gpt", "gpt")}, "roles_not_alternating", "turn 1"),
    ({"conversations": conv("human", "gpt", "gpt", "human")}, "roles_not_alternating", "turn 2"),
    ({"conversations": conv("human")}, "odd_turn_count", "1 turn"),
    ({"conversations": conv("human", "gpt", "human")}, "odd_turn_count", "3 turns"),
    ({"image": 3, "conversations": GOOD}, "image_bad_type", "number"),
    ({"image": [], "conversations": GOOD}, "image_bad_type", "empty list"),
    ({"image": ["a.jpg", None], "conversations": GOOD}, "image_bad_type", "[1]"),
    ({"image": {"path": "a.jpg"}, "conversations": GOOD}, "image_bad_type", "object"),
    ({"image": False, "conversations": GOOD}, "image_bad_type", "boolean"),
    ({"image": None, "conversations": conv("human", "gpt", value="<image>")}, "image_token_without_image",
     "`<image>` appears 2 times but the record has no usable image"),
    ({"image": ["a.jpg"], "conversations": conv("human", "gpt", value="<image>")}, "image_count_mismatch",
     "1 image but `<image>` appears 2 times"),
    ({"image": "data:image/png;base64,AAAA", "conversations": GOOD}, "image_remote_url", "a remote URL"),
    ({"image": "a.jpg", "cogalign_index": -1, "conversations": GOOD}, "cogalign_index_bad", "-1"),
    ({"image": "a.jpg", "cogalign_index": "3", "conversations": GOOD}, "cogalign_index_bad", "'3'"),
    ({"image": "a.jpg", "cogalign_index": True, "conversations": GOOD}, "cogalign_index_bad", "True"),
    # order of checks
    ({"conversations": [{"from": "gpt", "value": "x"}, "oops"]}, "turn_not_object", "turn 1"),
    ({"conversations": conv("gpt", "user")}, "turn_bad_role", "turn 1"),
    ({"conversations": conv("human", "human", "gpt")}, "roles_not_alternating", "turn 1"),
    ({"conversations": [{"from": "system", "value": 1}]}, "leading_system_turn", "system"),
    ({"image": 3, "conversations": conv("human")}, "odd_turn_count", "1 turn"),
    ({"conversations": conv("gpt")}, "roles_not_alternating", "turn 0"),
]


@pytest.mark.parametrize("record, reason, detail", REJECT_CASES)
def test_every_reject_reason(record, reason, detail):
    with pytest.raises(RecordError) as info:
        check_record(record)
    assert info.value.reason == reason
    assert detail in info.value.detail, info.value.detail
    assert info.value.reason in REJECT_REASONS


def test_all_reasons_covered_by_table():
    # invalid_json: the reader; image_conflict: the chat-turn conversion (turns.to_llava), before the check
    assert {reason for _, reason, _ in REJECT_CASES} | {"invalid_json", "image_conflict"} == set(REJECT_REASONS)


@pytest.mark.parametrize("record, check", [
    ({"id": "1", "image": "a.jpg", "conversations": GOOD}, RecordCheck("expand", "", "a.jpg", 1)),
    ({"image": "", "conversations": GOOD}, RecordCheck("expand", "", "", 1)),  # empty path: images.py rejects it
    ({"image": ["b.jpg", "c.jpg"], "conversations": conv("human", "gpt") * 3}, RecordCheck("expand", "", "b.jpg", 3)),
    ({"image": "a.jpg", "video": "v.mp4", "conversations": GOOD}, RecordCheck("expand", "", "a.jpg", 1)),
    ({"conversations": GOOD}, RecordCheck("pass", "text_only", None, 1)),
    ({"image": None, "conversations": GOOD}, RecordCheck("pass", "text_only", None, 1)),
    ({"video": "v.mp4", "conversations": GOOD}, RecordCheck("pass", "video", None, 1)),
    ({"video": "v.mp4", "image": None, "conversations": GOOD}, RecordCheck("pass", "video", None, 1)),
    ({"video": None, "conversations": GOOD}, RecordCheck("pass", "text_only", None, 1)),
    ({"id": None, "image": "a.jpg", "conversations": GOOD, "extra": {"x": [1]}}, RecordCheck("expand", "", "a.jpg", 1)),
    ({"id": {"weird": True}, "image": "a.jpg", "conversations": GOOD}, RecordCheck("expand", "", "a.jpg", 1)),
    ({"id": 5, "image": "a.jpg", "conversations": [{"from": "human", "value": "", "extra": 1}, {"from": "gpt", "value": ""}]},
     RecordCheck("expand", "", "a.jpg", 1)),
])
def test_accepted_records(record, check):
    assert check_record(record) == check


def test_record_check_is_frozen():
    c = check_record({"image": "a.jpg", "conversations": GOOD})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.action = "pass"


def test_check_does_not_mutate():
    record = {"id": 1, "image": ["a.jpg"], "conversations": conv("human", "gpt"), "k": [1]}
    snapshot = json.loads(json.dumps(record))
    check_record(record)
    assert record == snapshot


def test_long_and_deep_role_values_are_summarised():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RecordError) as info:
        check_record({"conversations": [{"from": deep, "value": "v"}, {"from": "gpt", "value": "v"}]})
    assert info.value.reason == "turn_bad_role" and len(info.value.detail) < 200
    with pytest.raises(RecordError) as info:
        check_record({"conversations": [{"from": "h" * 10000, "value": "v"}]})
    assert len(info.value.detail) < 200


# hypothesis: never anything but RecordError ---------------------------------------

roles = st.sampled_from(["human", "gpt", "system", "user", "assistant", "Human", "", None, 0, True]) | json_scalars
turns = st.one_of(
    st.fixed_dictionaries({"from": roles, "value": st.one_of(st.text(max_size=5), json_values)}),
    st.fixed_dictionaries({}, optional={"from": roles, "value": json_values, "role": roles, "content": json_values}),
    json_values,
)
images = st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3), st.lists(json_scalars, max_size=3), json_values)
near_records = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "image": images,
        "video": json_values,
        "conversations": st.one_of(st.lists(turns, max_size=6), json_values),
        "extra": json_values,
    },
)


def _check_or_reject(value):
    try:
        result = check_record(value)
    except RecordError as e:
        assert e.reason in REJECT_REASONS and e.reason != "invalid_json"
        assert isinstance(e.detail, str) and "\n" not in e.detail
        return None
    assert isinstance(result, RecordCheck)
    assert result.action in ("expand", "pass")
    assert result.n_pairs >= 1 and len(value["conversations"]) == 2 * result.n_pairs
    if result.action == "expand":
        assert result.pass_reason == "" and isinstance(result.image, str)
    else:
        assert result.pass_reason in ("text_only", "video") and result.image is None
    return result


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_check_record_any_json_value(value):
    _check_or_reject(value)


@settings(max_examples=250, deadline=None)
@given(near_records)
def test_check_record_near_records(value):
    _check_or_reject(value)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 5),
    image=st.one_of(st.none(), st.text(max_size=8), st.lists(st.text(max_size=8), min_size=1, max_size=3)),
    extra=st.dictionaries(st.sampled_from(["id", "meta", "data_source", "score"]), json_values, max_size=3),
    values=st.lists(st.text(max_size=10), min_size=10, max_size=10),
)
def test_well_formed_records_are_never_rejected(n, image, extra, values):
    record = dict(extra)
    values = [v.replace("<image>", "") for v in values]  # hypothesis draws the code's own string constants too
    record["conversations"] = [{"from": "human" if k % 2 == 0 else "gpt", "value": values[k]} for k in range(2 * n)]
    if image is not None or n % 2:
        record["image"] = image
    got = check_record(record)
    assert got.n_pairs == n
    if image is None:
        assert (got.action, got.pass_reason, got.image) == ("pass", "text_only", None)
    else:
        assert (got.action, got.image) == ("expand", image if isinstance(image, str) else image[0])


# ----------------------------------------------------------------- shared corpus

@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_corpus_record_level_outcomes(tmp_path, fmt):
    """check_record alone: record-shape cases give their reason; image cases all get to `expand`."""
    path, expected = make_bad_corpus(tmp_path, fmt=fmt)
    assert count_records(path) == len(expected)
    for (index, record), exp in zip(iter_records(path), expected, strict=True):
        assert index == exp.index
        if isinstance(record, RecordError):
            assert (exp.outcome, exp.reason) == ("reject", record.reason), exp
            continue
        if exp.outcome == "reject" and exp.reason in REJECT_REASONS:
            with pytest.raises(RecordError) as info:
                check_record(record)
            assert info.value.reason == exp.reason, exp
        elif exp.outcome == "pass":
            assert check_record(record).pass_reason == exp.reason, exp
        else:
            assert check_record(record).action == "expand", exp


# --------------------------------------------------------------- lone surrogates (issue 7 item 22)

_PIECES = ["a", "\\", "\\\\", "\ud800", "\udc00", "\ud83d\ude00", "\udbff", "é", "\"", "ud800", "\\ud800"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=6).map("".join), min_size=1, max_size=6),
       st.integers(1, 40))
def test_lone_surrogate_is_invalid_json_in_arrays_like_jsonl(tmp_path, strings, buf):
    """yajl would turn "\\ud800" into "?": every record holding a lone surrogate is `invalid_json`
    in a JSON array, exactly as in JSONL, whatever the read size cuts the escapes."""
    values = [{"k": s, "n": i} for i, s in enumerate(strings)]
    text = "".join(json.dumps(v) + "\n" for v in values)  # ensure_ascii: surrogates as \\u escapes
    jsonl = write(tmp_path / "a.jsonl", text)
    array = write(tmp_path / "a.json", "[" + ",".join(json.dumps(v) for v in values) + "]")
    old = records._JSON_BUF
    records._JSON_BUF = buf
    try:
        got_json = list(iter_records(array))
        assert count_records(array) == len(values)
    finally:
        records._JSON_BUF = old
    got_jsonl = list(iter_records(jsonl))
    for (i, a), (j, b), v in zip(got_json, got_jsonl, values):
        assert i == j
        v = json.loads(json.dumps(v))  # adjacent halves in the Python string become one pair in JSON
        lone = not _encodes(v["k"])
        assert isinstance(a, RecordError) == isinstance(b, RecordError) == lone, (v, a, b)
        if lone:
            assert a.reason == b.reason == "invalid_json"
        else:
            assert same(a, v) and same(b, v)


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def test_lone_surrogate_detail_names_the_element(tmp_path):
    path = write(tmp_path / "a.json", '[{"id": 1}, {"id": "x\\ud800y"}, {"id": "\\ud83d\\ude00"}]')
    got = list(iter_records(path))
    assert got[0] == (0, {"id": 1}) and got[2] == (2, {"id": "\U0001f600"})
    assert got[1][1].reason == "invalid_json" and "element 1" in got[1][1].detail and "\\ud800" in got[1][1].detail


@pytest.mark.parametrize("value", [-(2**63) - 1, -(2**63), 2**64 - 1, 2**64, -(10**19), 10**30])
def test_jsonl_integers_past_64_bits_stay_exact(value):
    """orjson reads -2**63 - 1 (19 digits) as a float; only runs of 20 digits were sent to json.loads."""
    from cogalign.inputs.records import loads_exact

    got = loads_exact(f'{{"v": {value}}}'.encode())["v"]
    assert type(got) is int and got == value
