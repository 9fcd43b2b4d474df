"""Where fine-tuning's data sets come from: the files the book's chapters 6 and 7 download.

Each is fetched once by `gpt2.data.fetch_named` (the mechanism The Verdict uses): looked for in
the data folder (`data/finetune/<name>`, checked against its SHA-256), then in $GPT2_DATA_MIRROR
(`<mirror>/finetune/<name>`), then downloaded and checked before it is saved. Offline, the error
names the URL and the path to save the file at by hand.
"""

from __future__ import annotations

from pathlib import Path

from ..data import NamedText, fetch_named
from ..errors import GPT2Error

_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
_INSTEAD = "pass the path of your own copy"

FINETUNE_FILES = {
    # Chapter 6: 5,572 SMS messages labelled ham or spam (Almeida & Hidalgo, UCI repository).
    # The download is a zip; the SHA-256 is of the tab-separated file inside it.
    "sms_spam": NamedText(
        "The SMS Spam Collection", "finetune/SMSSpamCollection",
        "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        "edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266",
        zip_member="SMSSpamCollection", instead=_INSTEAD),
    # Chapter 7: 1,100 instruction / input / output entries.
    "instructions": NamedText(
        "The book's instruction data", "finetune/instruction-data.json",
        _BOOK + "01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", instead=_INSTEAD),
    # Chapter 7's DPO notebook: the same 1,100 entries, each with a chosen and a rejected answer.
    "preferences": NamedText(
        "The book's preference data", "finetune/instruction-data-with-preference.json",
        _BOOK + "04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", instead=_INSTEAD),
}


def finetune_file(name: str, data_dir=None, download: bool = True) -> Path:
    """Path to one of FINETUNE_FILES ("sms_spam", "instructions", "preferences"), fetched once."""
    if name not in FINETUNE_FILES:
        raise GPT2Error(f"unknown fine-tuning data set {name!r}; choose one of {', '.join(FINETUNE_FILES)}")
    return fetch_named(FINETUNE_FILES[name], data_dir, download)
