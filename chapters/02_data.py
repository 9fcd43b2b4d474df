# %% [markdown]
# # Chapter 2: Working with text data
#
# A language model never sees letters: it sees integers. This chapter turns a short story into
# the batches a GPT trains on, following *LLMs from Scratch*, chapter 2:
#
# 1. the story (*The Verdict*, Edith Wharton, 1908);
# 2. a word-level tokenizer written by hand, and why it is not enough;
# 3. GPT-2's byte-pair encoding (tiktoken), with `<|endoftext|>`;
# 4. sliding windows: inputs and targets shifted by one token;
# 5. the data loader: batches, shuffling, drop_last, and a position that can be saved;
# 6. token embeddings and position embeddings: from ids to vectors.
#
# Each piece is built small first, then checked against the library version in `gpt2.data`.

# %%
import re

import numpy as np

import minigrad as mg
from gpt2.data import DataLoader, GPTDataset, create_dataloader, load_text, split_text
from gpt2.tokenizer import get_tokenizer
from minigrad import F, nn

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The story
#
# `load_text()` returns *The Verdict*: the first time it downloads it from the book's repository
# into `data/` and checks its SHA-256, afterwards it reads the local copy. (Offline, put the file
# at `data/the-verdict.txt`, or set `GPT2_DATA` to its path.)

# %%
raw_text = load_text()
print("Total number of characters:", len(raw_text))
print(raw_text[:99])
assert len(raw_text) == 20479

# %% [markdown]
# ## 2. A tokenizer by hand
#
# Split on whitespace and punctuation, give every distinct piece an id, and map back. This is
# the book's `SimpleTokenizerV1`.

# %%
preprocessed = [t.strip() for t in re.split(r'([,.:;?_!"()\']|--|\s)', raw_text) if t.strip()]
print(len(preprocessed), "tokens:", preprocessed[:12])
all_words = sorted(set(preprocessed))
vocab = {word: i for i, word in enumerate(all_words)}
print("vocabulary size:", len(vocab))


class SimpleTokenizerV1:
    def __init__(self, vocab):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text):
        pieces = [t.strip() for t in re.split(r'([,.:;?_!"()\']|--|\s)', text) if t.strip()]
        return [self.str_to_int[s] for s in pieces]

    def decode(self, ids):
        text = " ".join(self.int_to_str[i] for i in ids)
        return re.sub(r'\s+([,.?!"()\'])', r"\1", text)   # no space before punctuation


simple = SimpleTokenizerV1(vocab)
sample = """"It's the last he painted, you know," Mrs. Gisburn said with pardonable pride."""
ids = simple.encode(sample)
print(ids)
print(simple.decode(ids))   # close, not exact: the spacing around quotes is lost
assert simple.encode(simple.decode(ids)) == ids

# %% [markdown]
# Its weakness: a word it never saw has no id.

# %%
try:
    simple.encode("Hello, do you like tea?")
except KeyError as exc:
    print("unknown word:", exc)
else:
    raise AssertionError("expected an unknown word")

# %% [markdown]
# ## 3. Byte-pair encoding
#
# GPT-2's tokenizer starts from the 256 possible bytes, so *every* text has an encoding, and
# merges frequent pairs into longer tokens (50,000 merges learned by OpenAI). Common words are
# one token; rare words are split into pieces. Id 50256, `<|endoftext|>`, separates documents.

# %%
tokenizer = get_tokenizer()
text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
integers = tokenizer.encode(text)
print(integers)
print(tokenizer.decode(integers))
assert tokenizer.decode(integers) == text and 50256 in integers
assert tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]

pieces = [tokenizer.decode([i]) for i in tokenizer.encode("Akwirw ier")]
print("an unknown word, in pieces:", pieces)
assert "".join(pieces) == "Akwirw ier"

enc_text = tokenizer.encode(raw_text)
print("The Verdict is", len(enc_text), "tokens; vocabulary", tokenizer.n_vocab)
assert len(enc_text) == 5145

# %% [markdown]
# ## 4. Sliding windows
#
# The model learns to predict the next token at every position. From a window of
# `context_size + 1` tokens we get `context_size` examples at once: the input is the window
# without its last token, the target the window without its first.

# %%
enc_sample = enc_text[50:]
context_size = 4
x, y = enc_sample[:context_size], enc_sample[1:context_size + 1]
print(f"x: {x}\ny:      {y}")
for i in range(1, context_size + 1):
    print(tokenizer.decode(enc_sample[:i]), "---->", tokenizer.decode([enc_sample[i]]))

# %% [markdown]
# The dataset is every such window, starting every `stride` tokens. By hand, as the book's
# `GPTDatasetV1`, with a Python loop:

# %%
def windows_by_hand(token_ids, max_length, stride):
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i:i + max_length])
        targets.append(token_ids[i + 1:i + max_length + 1])
    return np.array(inputs), np.array(targets)


hand_x, hand_y = windows_by_hand(enc_text, max_length=4, stride=4)
print("windows:", hand_x.shape)

# %% [markdown]
# `gpt2.data.GPTDataset` builds the same windows with one gather: the start of each window
# plus the offsets 0..max_length, as an index array (no loop over tokens).

# %%
dataset = GPTDataset(enc_text, max_length=4, stride=4)
lib_x, lib_y = dataset.batch(np.arange(len(dataset)))
print("library windows:", lib_x.shape, "first:", lib_x[0], lib_y[0])
assert np.array_equal(lib_x, hand_x) and np.array_equal(lib_y, hand_y)
assert np.array_equal(lib_x[:, 1:], lib_y[:, :-1])   # targets: the inputs shifted by one

# %% [markdown]
# ## 5. The data loader
#
# Batches of windows. With `batch_size=1, max_length=4, stride=1` the first two batches
# overlap by three tokens (the book's example):

# %%
loader = create_dataloader(raw_text, batch_size=1, max_length=4, stride=1, shuffle=False, tokenizer=tokenizer)
batches = loader.batches()
first, second = next(batches), next(batches)
print(first, second, sep="\n")
assert first[0].tolist() == [[40, 367, 2885, 1464]] and first[1].tolist() == [[367, 2885, 1464, 1807]]
assert second[0].tolist() == [[367, 2885, 1464, 1807]]

# %% [markdown]
# For training: a larger batch, stride = max_length (no overlap, so no window is seen twice
# per epoch), shuffled with a seed. `drop_last` drops an incomplete final batch so every step
# sees the same number of tokens.

# %%
loader = create_dataloader(raw_text, batch_size=8, max_length=4, stride=4, shuffle=True, drop_last=True,
                           seed=123, tokenizer=tokenizer)
inputs, targets = next(iter(loader))
print("Inputs:\n", inputs, "\nTargets:\n", targets)
print(f"{len(loader.dataset)} windows -> {len(loader)} batches of 8 per epoch")
assert inputs.shape == targets.shape == (8, 4)
assert len(loader) == len(loader.dataset) // 8

# %% [markdown]
# The shuffle order of an epoch depends only on (seed, epoch), and the loader knows where it is,
# so training can stop and resume exactly: `state_dict()` is three numbers.

# %%
print(loader.state_dict())
resumed = DataLoader(loader.dataset, batch_size=8, shuffle=True, drop_last=True)
resumed.load_state_dict(loader.state_dict())
a, b = next(iter(loader)), next(iter(resumed))
assert np.array_equal(a[0], b[0])   # the same next batch
print("resumed loader gives the same next batch:", a[0][0])

# %% [markdown]
# Training and validation: the first 90% of the characters train, the last 10% validate.

# %%
train_text, val_text = split_text(raw_text, 0.9)
print(f"train: {len(train_text):,} characters, val: {len(val_text):,}")
assert train_text + val_text == raw_text and len(train_text) == int(0.9 * len(raw_text))

# %% [markdown]
# ## 6. Embeddings: from ids to vectors
#
# An embedding layer is a table with one row per token; looking a token up is the same as
# multiplying its one-hot vector by the table, only much cheaper. (The table's rows are learned
# like any other weights.)

# %%
mg.manual_seed(123)
input_ids = np.array([2, 3, 5, 1])
embedding = nn.Embedding(6, 3)            # vocabulary 6, 3 dimensions
looked_up = embedding(input_ids).numpy()
one_hot = np.eye(6, dtype=np.float32)[input_ids]          # (4, 6)
print(embedding.weight.numpy(), looked_up, sep="\n\n")
assert np.allclose(looked_up, one_hot @ embedding.weight.numpy())
assert np.allclose(F.embedding(input_ids, embedding.weight).numpy(), looked_up)

# %% [markdown]
# Attention (next chapter) has no notion of order, so GPT adds a second, learned embedding of
# the *position* 0..context-1 to each token's vector. The (T, C) position table broadcasts over
# the batch: (B, T, C) + (T, C) -> (B, T, C).

# %%
vocab_size, output_dim, max_length = 50257, 256, 4
token_embedding_layer = nn.Embedding(vocab_size, output_dim)
pos_embedding_layer = nn.Embedding(max_length, output_dim)
loader = create_dataloader(raw_text, batch_size=8, max_length=max_length, stride=max_length,
                           shuffle=False, tokenizer=tokenizer)
inputs, targets = next(iter(loader))
token_embeddings = token_embedding_layer(inputs)                 # (8, 4, 256)
pos_embeddings = pos_embedding_layer(np.arange(max_length))      # (4, 256)
input_embeddings = token_embeddings + pos_embeddings             # (8, 4, 256)
print(token_embeddings.shape, pos_embeddings.shape, input_embeddings.shape)
assert input_embeddings.shape == (8, 4, 256)
assert np.allclose(input_embeddings.numpy()[3, 2],
                   token_embedding_layer.weight.numpy()[inputs[3, 2]] + pos_embedding_layer.weight.numpy()[2])
