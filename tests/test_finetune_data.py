"""Fine-tuning data (gpt2.finetune): downloads with SHA-256, and the book's splits, padding and
masks, checked against the numbers the book's chapter 6 and 7 notebooks print.

The real files are found through $GPT2_DATA_MIRROR (tests/conftest.py points it at the CI
folder's copies, `<mirror>/finetune/...`); tests that need them skip where they are absent.
"""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
from gpt2_helpers import tokenizer_or_skip

from gpt2 import GPT2Error
from gpt2.data import NamedText, fetch_named
from gpt2.finetune import (
    FINETUNE_FILES,
    InstructionDataset,
    PreferenceDataset,
    classification_loader,
    collate_instructions,
    collate_preferences,
    finetune_file,
    format_input,
    format_response,
    instruction_loader,
    load_instruction_data,
    load_preference_data,
    load_spam_splits,
    preference_loader,
    split_instruction_data,
)
from gpt2.finetune.classify_data import balance, pad_token_ids, random_split, read_sms_collection

PAD = 50256


def file_or_skip(name, tmp_path):
    try:
        return finetune_file(name, data_dir=tmp_path, download=False)
    except GPT2Error as exc:
        pytest.skip(f"{FINETUNE_FILES[name].title} not available offline: {exc}")


# ---------------------------------------------------------------------------------------------
# Getting the files
# ---------------------------------------------------------------------------------------------

def test_offline_errors_name_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_DATA_MIRROR", raising=False)
    for name, named in FINETUNE_FILES.items():
        with pytest.raises(GPT2Error) as info:
            finetune_file(name, data_dir=tmp_path, download=False)
        msg = str(info.value)
        assert named.url in msg and str(tmp_path / named.filename) in msg and "\n" not in msg
        with pytest.raises(GPT2Error, match="could not download") as info:
            fetch_named(named, tmp_path, url=(tmp_path / "nowhere").as_uri())
        assert named.url in str(info.value)
    with pytest.raises(GPT2Error, match="extract SMSSpamCollection from it and save that as"):
        finetune_file("sms_spam", data_dir=tmp_path, download=False)
    with pytest.raises(GPT2Error, match="unknown fine-tuning data set"):
        finetune_file("imdb")


def test_zip_downloads_are_unpacked_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_DATA_MIRROR", raising=False)
    body = b"ham\tHello\nspam\tWIN now\n"
    archive = tmp_path / "sms.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme", "x")
        z.writestr("SMSSpamCollection", body)
    named = NamedText("SMS", "finetune/SMSSpamCollection", "https://example.invalid/sms.zip",
                      hashlib.sha256(body).hexdigest(), zip_member="SMSSpamCollection", instead="x")
    path = fetch_named(named, tmp_path / "data", url=archive.as_uri())
    assert path == tmp_path / "data" / "finetune" / "SMSSpamCollection" and path.read_bytes() == body
    assert read_sms_collection(path) == [(0, "Hello"), (1, "WIN now")]
    wrong = NamedText("SMS", "finetune/other", named.url, "0" * 64, zip_member="SMSSpamCollection")
    with pytest.raises(GPT2Error, match="does not match"):
        fetch_named(wrong, tmp_path / "data", url=archive.as_uri())
    missing = NamedText("SMS", "finetune/other", named.url, named.sha256, zip_member="nothing")
    with pytest.raises(GPT2Error, match="not a zip archive holding nothing"):
        fetch_named(missing, tmp_path / "data", url=archive.as_uri())
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(GPT2Error, match="not a zip archive"):
        fetch_named(named, tmp_path / "data2", url=bad.as_uri())
    # a wrong copy already in the data folder is reported, not used
    (tmp_path / "data" / "finetune" / "SMSSpamCollection").write_bytes(b"something else")
    with pytest.raises(GPT2Error, match="delete it to download it again"):
        fetch_named(named, tmp_path / "data", url=archive.as_uri())


def test_the_real_files_match_their_sha256(tmp_path):
    for name in FINETUNE_FILES:
        assert file_or_skip(name, tmp_path).is_file()


# ---------------------------------------------------------------------------------------------
# Chapter 6: spam classification
# ---------------------------------------------------------------------------------------------

def test_sms_balancing_and_split_are_the_books(tmp_path):
    messages = read_sms_collection(file_or_skip("sms_spam", tmp_path))
    labels = [label for label, _ in messages]
    assert len(messages) == 5572 and labels.count(0) == 4825 and labels.count(1) == 747
    assert messages[0] == (0, "Go until jurong point, crazy.. Available only in bugis n great world "
                              "la e buffet... Cine there got amore wat...")
    balanced = balance(messages)
    assert len(balanced) == 1494 and [m[0] for m in balanced] == [0] * 747 + [1] * 747
    train, val, test = random_split(balanced, 0.7, 0.1)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert [sum(m[0] for m in s) for s in (train, val, test)] == [517, 79, 151]  # spam per split
    assert train[0] == (0, "Dude how do you like the buff wind.")
    assert sorted(train + val + test) == sorted(balanced)


def test_sms_splits_are_padded_to_the_longest_training_message(tmp_path):
    tok = tokenizer_or_skip()
    file_or_skip("sms_spam", tmp_path)
    splits = load_spam_splits(tok, data_dir=tmp_path, download=False)
    assert splits.train.ids.shape == (1045, 120) and splits.val.ids.shape == (149, 120)   # the book's 120
    assert splits.test.ids.shape == (300, 120) and splits.train.ids.dtype == np.int64
    first = tok.encode("Dude how do you like the buff wind.")
    assert splits.train.ids[0, :len(first)].tolist() == first
    assert (splits.train.ids[0, len(first):] == PAD).all()
    assert splits.train.labels.tolist()[:1] == [0] and splits.train.labels.dtype == np.int64
    loaders = [classification_loader(splits.train, 8, shuffle=True, drop_last=True),
               classification_loader(splits.val, 8), classification_loader(splits.test, 8)]
    assert [len(lo) for lo in loaders] == [130, 19, 38]        # the book's batch counts
    ids, labels = next(iter(loaders[0]))
    assert ids.shape == (8, 120) and labels.shape == (8,)


def test_pad_token_ids_cuts_and_pads():
    out = pad_token_ids([[1, 2, 3], [4], []])
    np.testing.assert_array_equal(out, [[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]])
    np.testing.assert_array_equal(pad_token_ids([[1, 2, 3], [4]], max_length=2, pad_id=0), [[1, 2], [4, 0]])


def test_sms_file_that_is_not_the_collection_is_rejected(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("ham\thello\nmaybe\tspam?\n", encoding="utf-8")
    with pytest.raises(GPT2Error, match="row 2"):
        read_sms_collection(path)


# ---------------------------------------------------------------------------------------------
# Chapter 7: instruction fine-tuning
# ---------------------------------------------------------------------------------------------

def test_alpaca_prompt_format_is_the_books():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion")
    assert format_response(entry) == "\n\n### Response:\nThe correct spelling is 'Occasion.'"
    no_input = {"instruction": "What is an antonym of 'complicated'?", "input": "", "output": "simple"}
    assert format_input(no_input).endswith("### Instruction:\nWhat is an antonym of 'complicated'?")
    assert "### Input" not in format_input(no_input)


def test_instruction_split_is_the_books(tmp_path):
    file_or_skip("instructions", tmp_path)
    data = load_instruction_data(tmp_path, download=False)
    train, val, test = split_instruction_data(data)
    assert (len(data), len(train), len(val), len(test)) == (1100, 935, 55, 110)
    assert train[0] is data[0] and test[0] is data[935] and val[0] is data[1045]  # in file order
    assert data[50]["input"] == "Ocassion"


def test_collate_pads_and_masks_all_padding_targets_but_the_first():
    """The book's example batch (chapter 7, section 7.3)."""
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100],
                                            [8, 9, PAD, -100, -100]])
    assert inputs.dtype == targets.dtype == np.int64
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], max_length=3)
    np.testing.assert_array_equal(targets, [[1, 2, 3], [6, PAD, -100], [8, 9, PAD]])
    # prompt masking: prompts of 3, 1 and 2 tokens -> the first 2, 0 and 1 targets are ignored
    _, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], prompt_lengths=[3, 1, 2])
    np.testing.assert_array_equal(targets, [[-100, -100, 3, 4, PAD], [6, PAD, -100, -100, -100],
                                            [-100, 9, PAD, -100, -100]])
    with pytest.raises(GPT2Error):
        collate_instructions([])


def test_instruction_dataset_tokens_and_prompt_masks(tmp_path):
    tok = tokenizer_or_skip()
    file_or_skip("instructions", tmp_path)
    data = load_instruction_data(tmp_path, download=False)
    entry = data[50]
    prompt_ids = [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882, 326, 20431,
                  32543, 262, 2581, 13, 198, 198, 21017, 46486, 25, 198, 33234, 1958, 262, 3376, 24993,
                  286, 262, 1708, 1573, 13, 198, 198, 21017, 23412, 25, 198, 46, 66, 11857]
    assert tok.encode(format_input(entry)) == prompt_ids
    full = tok.encode(format_input(entry) + format_response(entry))
    assert full[:len(prompt_ids)] == prompt_ids and full[len(prompt_ids):][:5] == [198, 198, 21017, 18261, 25]
    ds = InstructionDataset([data[50], data[999]], tok)
    assert ds.examples[0] == full and ds.prompt_lengths.tolist()[0] == len(prompt_ids)
    inputs, targets = ds.batch(np.array([0, 1]))
    assert inputs.shape == targets.shape == (2, max(map(len, ds.examples)))
    np.testing.assert_array_equal(targets[0, :len(full) - 1], full[1:])
    masked = InstructionDataset([data[50], data[999]], tok, mask_prompt=True, max_length=30)
    inputs, targets = masked.batch(np.array([0, 1]))
    assert inputs.shape == (2, 30) and (targets == -100).all()   # 30 tokens: all still prompt
    masked.max_length = None
    _, targets = masked.batch(np.array([0]))
    n = len(prompt_ids)
    assert (targets[0, :n - 1] == -100).all() and targets[0, n - 1] == full[n] == 198
    loader = instruction_loader(InstructionDataset(data[:935], tok, max_length=1024), 8,
                                shuffle=True, drop_last=True)
    assert len(loader) == 116


# ---------------------------------------------------------------------------------------------
# DPO's preference data
# ---------------------------------------------------------------------------------------------

BOOK_CHOSEN_0 = [  # the book's DPO notebook, section 2.3: batch["chosen"][0] of data[:2]
    21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882, 326, 20431, 32543, 262, 2581,
    13, 198, 198, 21017, 46486, 25, 198, 36, 2100, 4985, 262, 1708, 9546, 416, 25449, 340, 656, 262,
    24993, 1813, 13, 198, 198, 21017, 23412, 25, 198, 19503, 521, 14610, 1545, 198, 198, 21017, 18261,
    25, 198, 464, 24993, 286, 262, 1813, 9546, 366, 19503, 521, 1, 318, 11491, 11, 262, 3376, 24993,
    318, 366, 6726, 1911] + [PAD] * 7
BOOK_CHOSEN_1_TAIL = [13, 198, 198, 21017, 18261, 25, 198, 1544, 2925, 284, 262, 3952, 790, 1110, 13]


def test_preference_batches_are_the_books(tmp_path):
    tok = tokenizer_or_skip()
    file_or_skip("preferences", tmp_path)
    data = load_preference_data(tmp_path, download=False)
    assert len(data) == 1100 and [len(s) for s in split_instruction_data(data)] == [935, 55, 110]
    ds = PreferenceDataset(data[:2], tok, max_length=1024)
    assert [len(p) for p in ds.prompts] == [48, 45]
    chosen, rejected = ds.batch(np.array([0, 1]))
    assert chosen.ids.shape == rejected.ids.shape == chosen.mask.shape == (2, 81)
    assert chosen.ids[0].tolist() == BOOK_CHOSEN_0
    assert chosen.ids[1].tolist()[44:59] == BOOK_CHOSEN_1_TAIL and (chosen.ids[1, 59:] == PAD).all()
    assert chosen.mask.dtype == bool
    # True from just after "\n\n" (prompt + 2) to the last real token; False on padding
    assert np.flatnonzero(chosen.mask[0]).tolist() == list(range(50, 74))
    assert np.flatnonzero(chosen.mask[1]).tolist() == list(range(47, 59))
    assert np.flatnonzero(rejected.mask[1]).tolist() == list(range(47, len(ds.rejected[1])))
    unmasked = PreferenceDataset(data[:2], tok, mask_prompt=False)
    chosen, _ = unmasked.batch(np.array([0]))
    assert np.flatnonzero(chosen.mask[0]).tolist() == list(range(74))
    loader = preference_loader(PreferenceDataset(data[:935], tok), 8, shuffle=True, drop_last=True)
    assert len(loader) == 116
    chosen, rejected = next(iter(loader))
    assert chosen.ids.shape == rejected.ids.shape


def test_collate_preferences_pads_both_to_one_width_and_truncates():
    chosen, rejected = collate_preferences([[1, 2], [3]], [[1, 2, 9, 9, 7], [3, 8, 8]],
                                           [[1, 2, 5], [3, 6, 6, 6, 6, 6]], pad_id=0)
    assert chosen.ids.shape == rejected.ids.shape == (2, 7)       # longest (6) + 1
    np.testing.assert_array_equal(chosen.ids[1], [3, 8, 8, 0, 0, 0, 0])
    np.testing.assert_array_equal(chosen.mask.astype(int), [[0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rejected.mask.astype(int)[1], [0, 0, 0, 1, 1, 1, 0])
    chosen, _ = collate_preferences([[1, 2]], [[1, 2, 9, 9, 7]], [[1]], mask_prompt=False, max_length=3)
    np.testing.assert_array_equal(chosen.ids, [[1, 2, 9]])
    assert chosen.mask.all()


def test_unreadable_data_files_give_one_line_errors(tmp_path):
    with pytest.raises(GPT2Error, match="cannot read the SMS Spam Collection"):
        read_sms_collection(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "x"}', encoding="utf-8")
    with pytest.raises(GPT2Error, match="not a JSON list of entries"):
        load_instruction_data(path=bad)
    bad.write_text("[", encoding="utf-8")
    with pytest.raises(GPT2Error, match="cannot read .* as JSON"):
        load_preference_data(path=bad)
