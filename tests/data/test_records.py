"""Records and their files: every bad input names file, line and expectation; valid files round-trip."""

import json
import os

import pytest

from cherrytop.data.records import (Comparison, Conversation, DataError, Message, Prompt, locate, read_comparisons,
                                    read_conversations, read_prompts, write_jsonl)

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


DEMO = {"messages": msgs((S, "be kind"), (U, "hi"), (A, "hello"))}
KWAY = {"prompt": {"messages": msgs((U, "pick"))}, "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}


def write_lines(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return p


def raises_at(read, path, line, *needles):
    """read(path) raises one DataError line naming the file, the line and what was expected."""
    with pytest.raises(DataError) as info:
        read(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{path.name}:{line}: " in msg, msg
    assert "; expected " in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---------------------------------------------------------------- bad input: file, line, expectation


def test_invalid_json_names_line_and_column(tmp_path):
    p = write_lines(tmp_path, [DEMO, "", '{"messages": [{"role": "user" "content": "x"}]}'])
    msg = raises_at(read_conversations, p, 3, "not valid JSON", "column 31", "one JSON object per line")
    assert msg.endswith("not valid JSON (Expecting ',' delimiter at column 31); expected one JSON object per line")


def test_unknown_role_suggests_the_closest(tmp_path):
    bad = {"messages": msgs((U, "hi"), ("assitant", "hello"))}
    p = write_lines(tmp_path, [DEMO, DEMO, bad])
    raises_at(read_conversations, p, 3, "message 2 has unknown role 'assitant'", "did you mean 'assistant'?",
              "expected one of system, user, assistant")
    p = write_lines(tmp_path, [{"messages": msgs(("human", "hi"), (A, "yo"))}])
    raises_at(read_conversations, p, 1, "'human'", "did you mean 'user'?")


def test_missing_messages_field(tmp_path):
    p = write_lines(tmp_path, [DEMO] * 4 + [{"mesages": DEMO["messages"]}])
    raises_at(read_conversations, p, 5, "missing field 'messages'", "did you mean 'messages'?",
              'expected {"messages": [{"role": ..., "content": ...}, ...]}')
    p = write_lines(tmp_path, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    raises_at(read_conversations, p, 1, "missing field 'messages' (found ShareGPT-style 'conversations')")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    p = tmp_path / "demos.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=r"demos\.jsonl: file is empty; expected JSONL records"):
        read_conversations(p)


def test_missing_path_names_it(tmp_path):
    (tmp_path / "demos.jsonl").write_text(json.dumps(DEMO) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl: no such file or folder$"):
        read_conversations(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match=r"did you mean '.*demos\.jsonl'"):
        read_conversations(tmp_path / "demo.jsonl")


def test_bom_and_crlf_are_fine(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(DEMO) + "\r\n").encode() * 2)
    assert len(read_conversations(p)) == 2


def test_non_object_line(tmp_path):
    p = write_lines(tmp_path, [DEMO, [1, 2]])
    raises_at(read_conversations, p, 2, "a list, not a JSON object", "one JSON object per line")


def test_json_array_file_is_explained(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([DEMO, DEMO], indent=2))
    raises_at(read_conversations, p, 1, "one JSON array", "jq")


def test_line_numbers_are_physical_with_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(f"\n{json.dumps(DEMO)}\n\n\n" + '{"messages": "hi"}\n')
    raises_at(read_conversations, p, 5, "'messages' is a string, not a list")


def test_locate_names_the_physical_line_of_a_record(tmp_path):
    p = write_lines(tmp_path, [DEMO, "", DEMO, DEMO])
    assert [locate(p, i) for i in range(3)] == [f"{p}:1", f"{p}:3", f"{p}:4"]


def test_bad_utf8_and_duplicate_keys_and_nan(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(DEMO).encode() + b"\n" + b'{"messages": "\xff"}\n')
    raises_at(read_conversations, p, 2, "not valid UTF-8")
    p.write_text('{"messages": [], "messages": []}\n')
    raises_at(read_conversations, p, 1, "key 'messages' appears twice")
    p.write_text('{"messages": [], "score": NaN}\n')
    raises_at(read_conversations, p, 1, "NaN")


@pytest.mark.parametrize("content, needle", [(["part"], "content is a list, not a string"),
                                             (None, "content is null, not a string"),
                                             (3, "content is a number, not a string")])
def test_content_not_a_string(tmp_path, content, needle):
    p = write_lines(tmp_path, [DEMO, {"messages": [{"role": U, "content": "q"}, {"role": A, "content": content}]}])
    raises_at(read_conversations, p, 2, "message 2 " + needle)


@pytest.mark.parametrize("messages, needle", [
    ([], "'messages' is empty"),
    (msgs((U, "hi")), "no assistant message"),
    (msgs((U, "hi"), (S, "x"), (A, "y")), "message 2 has role 'system' but is not first"),
    (["hi"], "message 1 is a string, not an object"),
    ([{"from": "human", "value": "hi"}], "ShareGPT"),
    ([{"role": U, "content": "x", "weight": 1}], "unknown key 'weight'"),
])
def test_conversation_validation(tmp_path, messages, needle):
    p = write_lines(tmp_path, [DEMO, DEMO, {"messages": messages}])
    raises_at(read_conversations, p, 3, needle)


def test_prompt_must_end_with_user(tmp_path):
    p = write_lines(tmp_path, [{"messages": msgs((U, "q"), (A, "a"))}])
    raises_at(read_prompts, p, 1, "ends with message 2 from 'assistant'", "ends with a user message")
    p = write_lines(tmp_path, [{"prompt": 5}])
    raises_at(read_prompts, p, 1, "'prompt' is a number")
    p = write_lines(tmp_path, [{"text": "hi"}])
    raises_at(read_prompts, p, 1, "missing field 'messages'", '{"prompt": "text"}')


@pytest.mark.parametrize("change, needles", [
    ({"responses": ["r"] * 10, "ranking": list(range(10))}, ["10 responses", "limit of 9", "2 to 9"]),
    ({"responses": ["r"], "ranking": [0]}, ["only 1 response", "minimum of 2"]),
    ({"responses": ["a", 3, "c", "d"]}, ["responses[1] is a number, not a string", "each response as a string"]),
    ({"responses": ["a", 7, "c", "d"]}, ["responses[1] is a number, not a string"]),
    ({"ranking": [2, 0, 2, 1]}, ["ranking lists response 2 twice and leaves out 3", "permutation of 0..3"]),
    ({"ranking": [2, 0, 1]}, ["ranking has 3 of 4 responses, missing 3", "permutation of 0..3"]),
    ({"ranking": [2, 0, 4, 1]}, ["ranking[2] is 4, out of range for 4 responses"]),
    ({"ranking": [2, 0, "x", 1]}, ["ranking[2] is 'x', not a whole number"]),
    ({"ties": [[1, 1]]}, ["ties[0] ties response 1 with itself", "distinct"]),
    ({"ties": [[0, 4]]}, ["ties[0] is [0, 4], out of range"]),
    ({"ties": [[0, 1, 2]]}, ["ties[0] is [0, 1, 2], not a pair"]),
    ({"prompt": {"messages": msgs((U, "q"), ("assitant", "a"), (U, "q"))}}, ["prompt message 2 has unknown role"]),
    ({"labeler": 3}, ["'labeler' is a number"]),
])
def test_comparison_validation(tmp_path, change, needles):
    p = write_lines(tmp_path, [KWAY, {**KWAY, **change}])
    raises_at(read_comparisons, p, 2, *needles)


def test_comparison_missing_ranking(tmp_path):
    bad = {k: v for k, v in KWAY.items() if k != "ranking"}
    p = write_lines(tmp_path, [bad])
    raises_at(read_comparisons, p, 1, "missing field 'ranking'", '"chosen"')


# ---------------------------------------------------------------- pairwise files -> K = 2


@pytest.mark.parametrize("prompt", ["What is 2+2?", msgs((U, "What is 2+2?")), {"messages": msgs((U, "What is 2+2?"))}])
def test_pairwise_prompt_shapes(tmp_path, prompt):
    rows = [{"prompt": prompt, "chosen": "4", "rejected": "5", "source": "hh"},
            {"prompt": prompt, "chosen": msgs((A, "4")), "rejected": msgs((A, "5"))},
            {"prompt": prompt, "chosen": msgs((U, "What is 2+2?"), (A, "4")),
             "rejected": msgs((U, "What is 2+2?"), (A, "5"))}]
    got = read_comparisons(write_lines(tmp_path, rows, "pairs.jsonl"))
    for c in got:
        assert c.prompt == (Message(U, "What is 2+2?"),)
        assert (c.responses, c.ranking, c.ties, c.k) == (("4", "5"), (0, 1), (), 2)
        assert c.pairs() == ((0, 1),)
    assert got[0].meta == {"source": "hh"} and got[1].meta == {}


def test_pairwise_implicit_prompt_and_mismatches(tmp_path):
    row = {"chosen": msgs((S, "s"), (U, "q"), (A, "good")), "rejected": msgs((S, "s"), (U, "q"), (A, "bad"))}
    (c,) = read_comparisons(write_lines(tmp_path, [row]))
    assert c.prompt == (Message(S, "s"), Message(U, "q")) and c.responses == ("good", "bad")
    bad = {**row, "rejected": msgs((S, "s"), (U, "other"), (A, "bad"))}
    raises_at(read_comparisons, write_lines(tmp_path, [row, bad]), 2, "differ before their last message (at message 2)")
    bad = {"prompt": "q2", **row}
    raises_at(read_comparisons, write_lines(tmp_path, [bad]), 1, "'chosen' does not repeat the prompt")
    bad = {"prompt": "q", "chosen": msgs((U, "q")), "rejected": "x"}
    raises_at(read_comparisons, write_lines(tmp_path, [bad]), 1, "'chosen' ends with message 1 from 'user'")
    bad = {"chosen": "a", "rejected": "b"}
    raises_at(read_comparisons, write_lines(tmp_path, [bad]), 1, "missing field 'prompt'",
              "or chosen/rejected as message lists (or HH transcripts) that share the prompt")


# ---------------------------------------------------------------- round trips and datasets folders


def sample_records():
    convs = [Conversation((Message(S, "sys"), Message(U, "héllo\u2028"), Message(A, "hi")),
                          {"source": "world", "id": 1}),
             Conversation((Message(U, "q"), Message(A, "a"), Message(U, "q2"), Message(A, "a2")),
                          {"source": "human", "id": 2})]
    prompts = [Prompt((Message(U, "2+2?"),), {"task": {"kind": "arith", "answer": 4}}),
               Prompt((Message(S, "s"), Message(U, "q")), {"task": {"kind": "qa", "answer": 0}})]
    comps = [Comparison((Message(U, "pick"),), ("a", "b", "c"), (2, 0, 1), ((0, 1),), "lab-1", {"overall": [3, 5, 6]},
                        {"batch": 6}),  # same keys in every row: Dataset.from_list takes columns from the first
             Comparison((Message(U, "p2"),), ("x", "y"), (1, 0), (), "lab-2", {"overall": [1, 2]}, {"batch": 7})]
    return convs, prompts, comps


def test_roundtrip_jsonl(tmp_path):
    convs, prompts, comps = sample_records()
    for recs, read in ((convs, read_conversations), (prompts, read_prompts), (comps, read_comparisons)):
        p = tmp_path / "r.jsonl"
        assert write_jsonl(p, recs) == len(recs)
        assert read(p) == recs
    assert comps[0].pairs() == ((2, 0), (2, 1))  # the tie (0, 1) gives no pair
    bare = write_lines(tmp_path, [{"prompt": "hi", "task": 1}])
    assert read_prompts(bare) == [Prompt((Message(U, "hi"),), {"task": 1})]


def test_datasets_folders_read_like_jsonl(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    convs, prompts, comps = sample_records()
    for i, (recs, read) in enumerate(((convs, read_conversations), (prompts, read_prompts), (comps, read_comparisons))):
        rows = [r.to_json() for r in recs]
        saved = tmp_path / f"saved{i}"
        datasets.Dataset.from_list(rows).save_to_disk(str(saved))
        write_jsonl(tmp_path / "x.jsonl", recs)
        assert read(saved) == read(tmp_path / "x.jsonl") == recs
        dd = tmp_path / f"dict{i}"
        splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
        datasets.DatasetDict(splits).save_to_disk(str(dd))
        assert read(dd) == recs
        pq = tmp_path / f"pq{i}"
        pq.mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(pq / "train.parquet"))
        assert read(pq) == recs


def test_datasets_folder_errors_name_the_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [DEMO, {"messages": msgs((U, "hi"), ("assitant", "x"))}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds: row 1: message 2 has unknown role 'assitant'.*; expected one of"):
        read_conversations(tmp_path / "ds")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: DatasetDict has splits test but no 'train'; expected"):
        read_conversations(tmp_path / "dd")


def test_parquet_file_that_datasets_cannot_read_names_it(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "demos.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"demos\.parquet: datasets cannot read this file \(ArrowInvalid: .*\); "
                                        r"expected a Parquet file$"):
        read_conversations(tmp_path / "demos.parquet")


def test_folder_of_jsonl_files_names_file_and_line(tmp_path):
    folder = tmp_path / "demos"
    folder.mkdir()
    write_lines(folder, [DEMO, DEMO], "train.jsonl")
    write_lines(folder, ["{oops"], "test.jsonl")  # another split: not read
    assert len(read_conversations(folder)) == 2
    write_lines(folder, [DEMO, {"messages": 3}], "train.jsonl")
    raises_at(read_conversations, folder / "train.jsonl", 2, "'messages' is a number")
    with pytest.raises(DataError, match=r"demos/train\.jsonl:2: 'messages' is a number"):
        read_conversations(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no data files; expected"):
        read_conversations(empty)


# ---------------------------------------------------------------- atomic writes


def test_write_jsonl_is_atomic(tmp_path):
    p = tmp_path / "out.jsonl"
    convs, _, _ = sample_records()
    write_jsonl(p, convs)
    before = p.read_bytes()
    bad = [convs[0], Conversation((Message(U, "q"), Message(A, "a")), {"tags": {"a", "b"}})]
    with pytest.raises(DataError, match=r"out\.jsonl:2: cannot be written as JSON.*; expected"):
        write_jsonl(p, bad)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jsonl"]

    def interrupted():
        yield convs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(p, interrupted())
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["out.jsonl"]


def test_write_jsonl_accepts_dicts_with_records_inside(tmp_path):
    p = tmp_path / "sub" / "d.jsonl"
    write_jsonl(p, [{"messages": [Message(U, "q"), Message(A, "a")]}])
    assert read_conversations(p) == [Conversation((Message(U, "q"), Message(A, "a")))]
    (tmp_path / "plain").write_text("")
    assert p.stat().st_mode == (tmp_path / "plain").stat().st_mode  # umask-made, not mkstemp's 0o600


def test_records_validate_on_construction():
    with pytest.raises(DataError, match="message has unknown role 'Assistant' \\(did you mean 'assistant'\\?\\)"):
        Message("Assistant", "x")
    with pytest.raises(DataError, match="ranking lists response 0 twice and leaves out 1"):
        Comparison((Message(U, "q"),), ("a", "b"), (0, 0))
    with pytest.raises(DataError, match="meta has key 'messages'"):
        Conversation((Message(U, "q"), Message(A, "a")), {"messages": []})
    c = Comparison([Message(U, "q")], ["a", "b", "c"], [1, 0, 2], [[0, 1]])
    assert c.prompt == (Message(U, "q"),) and c.ties == ((0, 1),) and hash(c) == hash(c)
    assert c.pairs() == ((1, 2), (0, 2))


# ---------------------------------------------------------------- a user's own comparison and prompt files


@pytest.mark.parametrize("ratings, needle", [
    ({"helpful": [9, 1, 2, 3]}, "ratings 'helpful' of response 0 is 9"),
    ({"helpful": [1, 0, 2, 3]}, "ratings 'helpful' of response 1 is 0"),
    ({"helpful": [1, 2.5, 2, 3]}, "ratings 'helpful' of response 1 is 2.5"),
    ({"helpful": [1, 2, 3]}, "ratings 'helpful' is 3 scores, for 4 responses"),
    ({"helpful": 5}, "ratings 'helpful' is a number, for 4 responses"),
    ([1, 2, 3, 4], "'ratings' is a list, not an object"),
])
def test_ratings_are_1_to_7_per_response(tmp_path, ratings, needle):
    raises_at(read_comparisons, write_lines(tmp_path, [KWAY, {**KWAY, "ratings": ratings}]), 2, needle,
              "expected {\"axis\": [4 scores, each a whole number 1..7 or null]}")
    ok = {**KWAY, "ratings": {"helpful": [7, 1, None, 4.0], "harmless": [1, 1, 1, 1]}}
    assert read_comparisons(write_lines(tmp_path, [ok]))[0].ratings == ok["ratings"]


def test_anthropic_hh_transcripts_are_read_as_messages(tmp_path):
    raw = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}
    split = {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}
    conversation = (Message(U, "hi"), Message(A, "hello"), Message(U, "2+2?"))
    for c in read_comparisons(write_lines(tmp_path, [raw, split])):
        assert (c.prompt, c.responses, c.ranking) == (conversation, ("4", "5"), (0, 1))
    (p,) = read_prompts(write_lines(tmp_path, [{"prompt": split["prompt"]}]))
    assert p.messages == conversation
    plain = {"prompt": "Human: is this a transcript?", "chosen": "no", "rejected": "yes"}  # no Assistant turn: plain text
    assert read_comparisons(write_lines(tmp_path, [plain]))[0].prompt == (Message(U, plain["prompt"]),)
    other = {**raw, "rejected": "\n\nHuman: bye\n\nAssistant: 5"}
    raises_at(read_comparisons, write_lines(tmp_path, [other]), 1, "differ before their last message (at message 1)")


@pytest.mark.parametrize("read, row, needle", [
    (read_prompts, {"prompt": ""}, "'prompt' is blank"),
    (read_prompts, {"prompt": "  \n"}, "'prompt' is blank"),
    (read_prompts, {"messages": msgs((S, "s"), (U, " "))}, "'messages' ends with a blank user message (message 2)"),
    (read_comparisons, {"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is blank"),
    (read_comparisons, {**KWAY, "prompt": {"messages": msgs((U, ""))}}, "'prompt' is blank"),
    (read_comparisons, {"chosen": msgs((U, ""), (A, "a")), "rejected": msgs((U, ""), (A, "b"))}, "'prompt' is blank"),
])
def test_blank_prompts_in_files_stop(tmp_path, read, row, needle):
    raises_at(read, write_lines(tmp_path, [row]), 1, needle, "expected a prompt whose last user message has text")


def test_a_csv_file_says_it_is_read_as_json_lines(tmp_path):
    p = tmp_path / "demos.csv"
    p.write_text("role,content\nuser,hi\n", encoding="utf-8")
    raises_at(read_conversations, p, 1, "not valid JSON", "a .csv file is read as JSON lines")


# ---------------------------------------------------------------- identical answers (issue 26, finding 12)


def test_identical_answers_ranked_apart_are_refused(tmp_path):
    dup = {**KWAY, "responses": ["a", "b", "a", "d"], "ranking": [0, 1, 2, 3]}
    p = write_lines(tmp_path, [KWAY, dup])
    raises_at(read_comparisons, p, 2, "responses 0 and 2 are the same text but ranked apart", '"ties": [[0, 2]]')


def test_identical_answers_tied_are_read(tmp_path):
    dup = {**KWAY, "responses": ["a", "b", "a", "d"], "ranking": [0, 2, 1, 3], "ties": [[2, 0]]}
    (c,) = read_comparisons(write_lines(tmp_path, [dup]))
    assert (0, 2) not in c.pairs() and (2, 0) not in c.pairs() and len(c.pairs()) == 5


def test_chosen_equal_to_rejected_is_refused_unless_tied(tmp_path):
    same = {"prompt": "what is 2 plus 2 ?", "chosen": "4 .", "rejected": "4 ."}
    p = write_lines(tmp_path, [{**same, "rejected": "5 ."}, same])
    raises_at(read_comparisons, p, 2, "'chosen' and 'rejected' are the same answer", "two different answers")
    (c,) = read_comparisons(write_lines(tmp_path, [{**same, "ties": [[0, 1]]}], "tied.jsonl"))
    assert c.pairs() == ()


def test_a_write_into_a_read_only_folder_names_the_file_asked_for(tmp_path, monkeypatch):
    """The error names `out.jsonl`, not the hidden temporary file written first (the CLI prints it as one line)."""
    import errno
    import os

    from cherrytop.data import records
    real = os.open

    def read_only(path, *a, **kw):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(records.os, "open", read_only)
    with pytest.raises(OSError) as e:
        records.write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    assert e.value.filename == str(tmp_path / "out.jsonl") and e.value.strerror == "Read-only file system"
    assert list(tmp_path.iterdir()) == []
