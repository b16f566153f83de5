"""Instruction data: formats, loss masks, packing with document boundaries, the cache, and
bad input (errors that name the file and line)."""

from __future__ import annotations

import os

import pytest
import torch

from dist_lora.config import ConfigError
from dist_lora.data import ByteTokenizer, SftSettings, build_sequences, load_sft_dataset, load_tokenizer
from dist_lora.data.packing import attention_mask, best_fit_decreasing, pack
from dist_lora.data.records import Fields
from dist_lora.data.samples import IGNORE, Sample, make_sample
from tests.sft_data import chat, save_tokenizer, write_jsonl

BYTES = ByteTokenizer()


def trained_text(tokenizer, sample: Sample) -> str:
    ids = [label for label in sample.labels if label != IGNORE]
    return tokenizer.decode(ids) if hasattr(tokenizer, "decode") else tokenizer._tok.decode(ids)


def test_prompt_completion_trains_the_completion_and_its_eos() -> None:
    sample = make_sample({"prompt": "Q: 2+3?", "completion": " 5"}, "prompt_completion", BYTES, Fields(), False)
    assert trained_text(BYTES, sample) == " 5\n\n"  # the byte tokenizer's end of document is a blank line
    assert len(sample.inputs) == len(sample.labels) == len("Q: 2+3? 5\n\n") - 1
    everything = make_sample({"prompt": "Q: 2+3?", "completion": " 5"}, "prompt_completion", BYTES, Fields(), True)
    assert IGNORE not in everything.labels


def test_chat_template_round_trip_on_a_real_tokenizer(tmp_path) -> None:
    tokenizer = load_tokenizer(save_tokenizer(str(tmp_path / "tok")))
    record = chat("What is 2 plus 3?", "2 plus 3 is 5.", "Spell apple backwards.", "elppa", system="Be brief.")
    sample = make_sample(record, "messages", tokenizer, Fields(), False)
    trained = trained_text(tokenizer, sample)
    assert trained == "2 plus 3 is 5.<|im_end|>\nelppa<|im_end|>\n"
    full = tokenizer._tok.apply_chat_template(record["messages"], tokenize=False)
    assert tokenizer._tok.decode(sample.inputs + [sample.labels[-1]]) == full  # inputs + last label = the rendering


def test_builtin_template_masks_all_but_the_answers() -> None:
    sample = make_sample(chat("hi", "hello", "2+2?", "4"), "messages", BYTES, Fields(), False)
    assert trained_text(BYTES, sample) == "hello<|end|>\n4<|end|>\n"


def test_best_fit_decreasing_fits_and_is_tight() -> None:
    lengths = [7, 5, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in bins of 10: optimal here


def test_packed_rows_restart_positions_and_mask_across_documents() -> None:
    samples = [Sample([1, 2, 3], [2, 3, 4]), Sample([5, 6], [IGNORE, 7]), Sample([8], [9])]
    rows = pack(samples, 8, packing=True, pad=0)
    assert rows["tokens"].shape == (1, 8)
    assert rows["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert rows["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 2, -1, -1]
    assert rows["labels"][0, -2:].tolist() == [IGNORE, IGNORE]
    mask = attention_mask(rows["document_ids"])[0, 0]  # True = may not attend
    allowed = [[int(not m) for m in row] for row in mask.tolist()]
    assert allowed[4] == [0, 0, 0, 1, 1, 0, 0, 0]  # the second document sees itself only
    assert allowed[5] == [0, 0, 0, 0, 0, 1, 0, 0]
    unpacked = pack(samples, 8, packing=False, pad=0)
    assert unpacked["tokens"].shape == (3, 8) and unpacked["document_ids"][1].tolist()[:3] == [0, 0, -1]


def test_formats_are_detected_and_read_from_jsonl_parquet_and_disk(tmp_path) -> None:
    import datasets

    records = [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(10)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    results = [build_sequences(p, BYTES, SftSettings(seq_len=32), show_progress=False)
               for p in (jsonl, str(tmp_path / "d.parquet"), str(tmp_path / "saved"))]
    assert all(stats["format"] == "prompt_completion" for _, stats in results)
    for tensors, _ in results[1:]:
        assert all(torch.equal(tensors[k], results[0][0][k]) for k in tensors)


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "d.jsonl:2: field 'completion' must be a string"),
        ([chat("q", "a"), {"messages": [{"role": "robot", "content": "x"}]}], "d.jsonl:2: message 0 has role 'robot'"),
        ([chat("q", "a"), "", {"messages": [{"role": "user", "content": 5}]}], "d.jsonl:3: message content must be a string"),
        ([chat("q", "a"), chat("q")], "d.jsonl:2: the conversation has no assistant turn"),
        (['{"prompt": "a", "completion": "b"}', "{not json"], "d.jsonl:2 is not valid JSON"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, lines, message) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        build_sequences(path, BYTES, SftSettings(seq_len=64), show_progress=False)


def test_skip_invalid_counts_conversations_without_an_answer(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), chat("q"), chat("q2", "a2"), chat("q3", "a3")])
    _, stats = build_sequences(path, BYTES, SftSettings(seq_len=64, skip_invalid=True), show_progress=False)
    assert stats["skipped_invalid"] == 1 and stats["samples"] == 3


def test_messages_without_a_chat_template_is_refused(tmp_path) -> None:
    tokenizer = load_tokenizer(save_tokenizer(str(tmp_path / "tok"), chat_template=None))
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")] * 3)
    with pytest.raises(ConfigError, match="has no chat template.*prompt_completion"):
        build_sequences(path, tokenizer, SftSettings(seq_len=64), show_progress=False)


def test_overlong_rules(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * n, "completion": "c" * 4} for n in (4, 40, 8, 50)])
    _, dropped = build_sequences(path, BYTES, SftSettings(seq_len=24, eval_fraction=0), show_progress=False)
    assert dropped["overlong"] == 2 and dropped["train_sequences"] == 1  # the two short ones share a sequence
    tensors, _ = build_sequences(path, BYTES, SftSettings(seq_len=24, overlong="truncate", eval_fraction=0, packing=False), show_progress=False)
    assert tensors["train.tokens"].shape[0] == 2  # truncated long prompts keep no answer: dropped as label-free
    with pytest.raises(ConfigError, match="2 samples are longer than data.seq_len=24"):
        build_sequences(path, BYTES, SftSettings(seq_len=24, overlong="error"), show_progress=False)
    with pytest.raises(ConfigError, match=r"no sample is left to train on: 4 of 4 .*lengths min 9"):
        build_sequences(path, BYTES, SftSettings(seq_len=8), show_progress=False)


def test_cache_is_built_once_and_reused(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    settings = SftSettings(seq_len=64)
    first = load_sft_dataset(path, BYTES, settings, str(tmp_path / "cache"))
    stamp = os.path.getmtime(first.file)
    again = load_sft_dataset(path, BYTES, settings, str(tmp_path / "cache"))
    assert again.file == first.file and os.path.getmtime(again.file) == stamp
    other = load_sft_dataset(path, BYTES, SftSettings(seq_len=48), str(tmp_path / "cache"))
    assert other.file != first.file
    batch = first.batch("train", 0, 2)
    assert batch.tokens.shape == (2, 64) and batch.attention_mask().shape == (2, 1, 64, 64)


def test_a_waiting_rank_raises_the_builders_error(tmp_path, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "x", "content": "y"}]}])
    with pytest.raises(ConfigError, match="d.jsonl:2"):
        load_sft_dataset(path, BYTES, SftSettings(), str(tmp_path / "cache"))  # local rank 0 builds and fails
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="d.jsonl:2"):
        load_sft_dataset(path, BYTES, SftSettings(), str(tmp_path / "cache"))  # rank 1 reads the same error
