"""Loading problems from JSONL / CSV / Parquet with a column mapping; malformed rows are errors
that name file, row and field, or are skipped and counted."""

import json
from pathlib import Path

import pytest

from seqrl.tasks.files import DataError, load_examples

TOY = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_toy.jsonl"


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_shipped_gsm8k_toy_file_loads_with_a_mapping():
    examples, report = load_examples(TOY, columns={"prompt": "question"})
    assert len(examples) == report.rows == 40 and report.skipped == 0
    assert examples[0].prompt.startswith("Gus has 4 marbles")
    assert examples[0].answer.endswith("#### 13")


def test_malformed_json_row_names_file_and_row(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, "{oops", ""])
    with pytest.raises(DataError, match=r"d\.jsonl, row 2: not valid JSON.*on_error='skip'"):
        load_examples(path)


def test_missing_and_wrongly_typed_fields_name_the_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "x"}])
    with pytest.raises(DataError, match=r"row 2: field 'answer' \(answer\) is missing.*'prompt'"):
        load_examples(path)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"q": ["not", "text"], "answer": "2"}])
    with pytest.raises(DataError, match=r"row 1: field 'q' \(prompt\) must be text"):
        load_examples(path, columns={"prompt": "q"})
    path = _write_jsonl(tmp_path / "f.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"row 1: expected an object"):
        load_examples(path)


def test_skip_mode_counts_and_keeps_the_good_rows(tmp_path):
    rows = [
        {"prompt": "1+1=", "answer": 2},
        "{bad",
        {"prompt": "", "answer": "3"},
        {"prompt": "2+2=", "answer": "4", "level": 1},
    ]
    examples, report = load_examples(_write_jsonl(tmp_path / "d.jsonl", rows), on_error="skip")
    assert [e.prompt for e in examples] == ["1+1=", "2+2="]
    assert examples[0].answer == "2" and examples[1].meta == {"level": 1}
    assert (report.rows, report.skipped) == (4, 2)
    assert "row 2" in report.first_problems[0] and "row 3" in report.first_problems[1]


def test_csv_with_mapping_and_a_row_with_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,solution\nWhat is 2+3?,5\n"Is 1,000 big?",yes\nx,y,z\n')
    with pytest.raises(DataError, match=r"d\.csv, row 3: 1 more cell"):
        load_examples(path, columns={"prompt": "question", "answer": "solution"})
    examples, report = load_examples(
        path, columns={"prompt": "question", "answer": "solution"}, on_error="skip"
    )
    assert [(e.prompt, e.answer) for e in examples] == [
        ("What is 2+3?", "5"),
        ("Is 1,000 big?", "yes"),
    ]
    assert report.skipped == 1


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {"prompt": ["def f(x):", "def g():"], "tests": ["assert f(1)", None], "answer": ["", "ok"]}
    )
    pq.write_table(table, tmp_path / "d.parquet")
    examples, _ = load_examples(
        tmp_path / "d.parquet", required=("prompt", "tests"), on_error="skip"
    )
    assert len(examples) == 1 and examples[0].meta["tests"] == "assert f(1)"


def test_file_level_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'.*\.jsonl"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="unknown column-mapping field"):
        load_examples(TOY, columns={"question": "prompt"})
    empty = _write_jsonl(tmp_path / "e.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(empty, on_error="skip")


def test_bytes_that_are_not_utf8_name_file_row_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"prompt": "1+1=", "answer": "2"}\n'
        b'{"prompt": "caf\xe9 au lait?", "answer": "3"}\n'  # Latin-1 in a UTF-8 file
        b'{"prompt": "2+2=", "answer": "4"}\n'
    )
    with pytest.raises(DataError, match=r"d\.jsonl, row 2: byte 0xe9 at character 16 is not UTF-8"):
        load_examples(path)
    examples, report = load_examples(path, on_error="skip")
    assert [e.prompt for e in examples] == ["1+1=", "2+2="]
    assert (report.rows, report.skipped) == (3, 1) and "row 2: byte 0xe9" in report.first_problems[
        0
    ]

    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'prompt,answer\n1+1=,2\n"multi\nline",3\ncaf\xe9,4\n')
    with pytest.raises(DataError, match=r"d\.csv, row 3: field 'prompt': byte 0xe9 at character 4"):
        load_examples(csv_path)
    examples, report = load_examples(csv_path, on_error="skip")
    assert [e.answer for e in examples] == ["2", "3"] and report.skipped == 1

    csv_path.write_bytes(b"prompt,answ\xe9r\n1+1=,2\n")  # the header: nothing can be skipped
    with pytest.raises(DataError, match=r"row 0 \(the header\), column 2: byte 0xe9"):
        load_examples(csv_path, on_error="skip")


def test_a_lone_surrogate_escape_is_a_malformed_row(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        ['{"prompt": "x\\ud800y", "answer": "1"}', {"prompt": "ok", "answer": 2}],
    )
    with pytest.raises(DataError, match=r"row 1: field 'prompt' \(prompt\) holds a lone surrogate"):
        load_examples(path)
    examples, report = load_examples(path, on_error="skip")
    assert [e.prompt for e in examples] == ["ok"] and report.skipped == 1


def test_each_example_records_its_file_and_row(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "a", "answer": 1}, "", "{bad", {"prompt": "b", "answer": 2}],
    )
    examples, _ = load_examples(path, on_error="skip")
    assert [e.source for e in examples] == [f"{path}, row 1", f"{path}, row 4"]


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Which word comes first? owl fox"},
            {"role": "assistant", "content": "owl"},
        ],
        "kind": "first",
    },
    {
        "messages": [{"role": "user", "content": "Which is larger? 3 7"}],
        "answer": 7,
        "reasoning": "7 > 3, so: 7",
    },
]


def test_chat_rows_keep_their_turns_and_the_reply_is_answer_and_demonstration(tmp_path):
    examples, _ = load_examples(_write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    first, second = examples
    assert first.prompt == "Which word comes first? owl fox"  # the last user turn
    assert [t["role"] for t in first.meta["messages"]] == ["system", "user"]  # reply removed
    assert first.answer == "owl" and first.meta["completion"] == "owl"
    assert first.meta["kind"] == "first"
    assert second.answer == "7" and "completion" not in second.meta
    # a column mapping names the demonstration (and the chat) like any other field
    mapped, _ = load_examples(
        _write_jsonl(tmp_path / "c2.jsonl", CHAT_ROWS[1:]), columns={"completion": "reasoning"}
    )
    assert mapped[0].meta["completion"] == "7 > 3, so: 7" and mapped[0].answer == "7"


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "must be a non-empty list"),
        ([{"role": "user"}], r"turn 0: expected \{'role'"),
        ([{"role": "robot", "content": "hi"}], "role must be one of system, user"),
        (
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
            "end with a user",
        ),
    ],
)
def test_malformed_chat_rows_name_the_turn(tmp_path, messages, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages, "answer": "x"}])
    with pytest.raises(DataError, match=rf"row 1: .*{expected}"):
        load_examples(path)


def test_saved_dataset_dict_splits_and_a_folder_of_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"train": [{"q": "1+1=", "a": "2"}] * 3, "test": [{"q": "2+2=", "a": "4"}]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
    dd.save_to_disk(tmp_path / "dd")
    columns = {"prompt": "q", "answer": "a"}
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\].*task.train_split"):
        load_examples(tmp_path / "dd", columns=columns)
    test, _ = load_examples(tmp_path / "dd", columns=columns, split="test")
    assert [e.prompt for e in test] == ["2+2="]
    train, _ = load_examples(tmp_path / "dd", columns=columns, default_split="train")
    assert len(train) == 3
    with pytest.raises(DataError, match="no split 'validation'"):
        load_examples(tmp_path / "dd", columns=columns, split="validation")
    # data files laid out as a Hub dataset repository holds them (what `hf download` writes)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    _write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", rows["train"])
    _write_jsonl(tmp_path / "repo" / "data" / "test.jsonl", rows["test"])
    test, _ = load_examples(tmp_path / "repo", columns=columns, default_split="test")
    assert [e.answer for e in test] == ["4"]


def test_a_hub_dataset_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # offline, as HF_HUB_OFFLINE=1 makes it (read at import, so set where the libraries read it)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # empty
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"'someone/no-such-data'.*Hub dataset failed.*--local-dir"):
        load_examples("someone/no-such-data")
    with pytest.raises(DataError, match="does not exist"):  # a missing file is not a Hub id
        load_examples("data/train.jsonl")
