"""A user's own files at the training stages: pretraining corpora and SFT demonstrations read as
the README promises; bad ones stop with one line naming file and line; nothing is dropped unreported."""

import json

import pytest

from cherrytop.config import load_config
from cherrytop.data.records import DataError, read_conversations
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.stages.pretrain import read_documents
from cherrytop.stages.sft import encode_all


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(read, path, where, *needles):
    with pytest.raises(DataError) as info:
        read(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}{where}"), msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---------------------------------------------------------------- pretrain.data


def test_txt_documents_split_on_lines_of_only_spaces_and_crlf(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_bytes("\ufefffirst doc\r\nstill first\r\n  \r\nsecond doc\n\t\n\n\nthird doc ✓\n".encode("utf-8"))
    assert read_documents(p) == ["first doc\nstill first", "second doc", "third doc ✓"]


@pytest.mark.parametrize("name, data, where", [
    ("corpus.txt", b"good doc\n\nbad caf\xe9 doc\n", ":3: "),
    ("corpus.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: "),
])
def test_latin1_bytes_name_file_and_line(tmp_path, name, data, where):
    p = tmp_path / name
    p.write_bytes(data)
    one_line_error(read_documents, p, where, "not valid UTF-8 (byte 0xe9", "; expected UTF-8 text")


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "usr", "content": "hi"}]}, "unknown role 'usr' (did you mean 'user'?)"),
    ({"messages": ["hi"]}, "message 1 is a string, not an object"),
    ({"messages": []}, "'messages' is empty"),
    ({"text": 5}, "'text' is a number, not a string"),
    ({"text": "a", "messages": []}, "both 'text' and 'messages'"),
    ({"txt": "a"}, "missing field 'text' (found 'txt': did you mean 'text'?)"),
])
def test_bad_corpus_records_name_the_line(tmp_path, row, needle):
    p = jsonl(tmp_path / "corpus.jsonl", [{"text": "fine"}, row])
    one_line_error(read_documents, p, ":2: ", needle, "; expected ")


def test_corpus_jsonl_keeps_text_with_line_separators_and_reads_messages(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p = jsonl(tmp_path / "corpus.jsonl", [{"text": "one\u2028line \U0001F600", "id": 1}, {"messages": conv}])
    assert read_documents(p) == ["one\u2028line \U0001F600", conv]


def test_corpus_from_a_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a b c"}, {"text": "d e f"}]).save_to_disk(str(tmp_path / "ds"))
    assert read_documents(tmp_path / "ds") == ["a b c", "d e f"]


def test_a_plain_text_file_not_named_txt_says_it_is_read_as_json_lines(tmp_path):
    p = tmp_path / "corpus.md"
    p.write_text("# My notes\n\nsome text\n", encoding="utf-8")
    one_line_error(read_documents, p, ":1: ", "a .md file is read as JSON lines")


# ---------------------------------------------------------------- sft.data


def test_sft_reports_demonstrations_cut_or_left_out(tmp_path, capsys):
    tok = train_tokenizer(["the cat sat on the mat .", "hello there , how are you ?"] * 20, vocab_size=300,
                          min_frequency=1)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat sat . " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "the cat sat . " * 40}, {"role": "assistant", "content": "ok"}]}
    p = jsonl(tmp_path / "demos.jsonl", [short, long_answer, short, long_prompt])
    examples = encode_all(tok, read_conversations(p), 32, p)
    err = " ".join(capsys.readouterr().err.split())  # as one line, whatever the console's wrapping
    assert len(examples) == 3 and all(len(ids) <= 32 for ids, _ in examples)
    assert "2 of 4 demonstrations cut to sft.seq_len=32 tokens" in err, err
    assert "left out 1 of 4 demonstrations, with no assistant token within 32 tokens (the first at" in err, err
    assert "demos.jsonl:4)" in err.replace(" ", ""), err  # the prompt that leaves the answer no room


# ---------------------------------------------------------------- rm.train.data


def test_rm_on_a_single_comparison_says_one_is_held_out(tmp_path):
    from cherrytop.stages import reward

    p = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    cfg = load_config("test", [], [f"--rm.train.data={p}", f"--run.out_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match=r"pairs\.jsonl: only 1 comparison, held out for the accuracy; expected at least 2"):
        reward.run(cfg)
